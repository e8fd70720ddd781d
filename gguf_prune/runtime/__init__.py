"""llama.cpp tools: the one pinned llama.cpp build, the door to it, evaluation (`eval`), packaging
(`package`) and `doctor`.
"""
