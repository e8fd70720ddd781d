"""llama.cpp tools: the one pinned llama.cpp build, the door to it, evaluation (`eval`), packaging
(`package`) and `doctor`.

- toolchain.py: the pinned llama.cpp: its paths, ``find``, and the native build
- portable_build.py: the portable llama-server (every x86-64 CPU variant) that packages ship
- toolchain_setup.py: ``python -m gguf_prune.runtime.toolchain setup|path|portable`` and the Python side of set-up
- llamacpp.py: the one door to llama.cpp (bindings and binaries)
- evaluate.py: `eval`: perplexity, speed and size of a GGUF against its base
- prompts.py: task prompts for `eval`: the file's checks, each answer's checks, running them
- report.py: reports: a terminal table, report.json, report.md and PNG plots
- package.py: `package`: one executable with llama-server, its libraries and the model
- launcher.py: the shell launcher at the head of a package
- doctor.py: `doctor`: what was found, where, and what is missing
"""
