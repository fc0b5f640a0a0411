"""A fake NVIDIA driver layer for real kubelet nodes without GPUs.

Three programs share one directory per node (the "driver directory", `driverdir`): the device
plugin (`modelfleet sim-gpu-plugin`, `plugin`) advertises its GPUs to the kubelet and hands them
out; the vLLM stand-in, running in a container the kubelet gave GPUs to, records the memory it
holds on them; the agent reads memory and health back through a pynvml-compatible module
(`fakenvml`, the agent's `--fake-gpu-dir`). So memory, pod attribution and health follow what the
kubelet's device manager really did.

`driverdir` and `fakenvml` are plain file I/O (the agent and the stand-in import them); only
`plugin` and its descriptors (`deviceplugin`) speak gRPC.
"""
