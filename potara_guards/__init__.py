"""What guards the files and network records the project reads: safe file I/O, the adapter file, the validator of
untrusted tensors, the server's checks of a client's update, CIFAR-style pickles read without running code. The
method's files (lora.py, fed.py, potara.py) import none of this; the demos' harness, data.py and the Flower app do."""
