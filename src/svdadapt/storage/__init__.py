"""Files on disk, below everything that reads or writes them: ``manifest`` (sha256 manifests of a directory) and
``shards`` (the safetensors checkpoint reader and the sharded writer, with the streaming journal's file names).
Imports no other svdadapt package.
"""
