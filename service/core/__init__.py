"""The frozen backbone and what runs it: open_clip access, image and text encoders, prompted forwards, file I/O."""
