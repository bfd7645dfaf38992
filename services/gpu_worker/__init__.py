"""The gpu-worker service: takes tasks from the gpu and cpu queues, runs each in a child process."""
