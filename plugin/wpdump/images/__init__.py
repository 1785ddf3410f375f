"""The image layer: CRIU's image format (format.py: magics, framing, pagemap/inventory/stats codecs;
decode.py: any image as JSON), chains of iterations linked by ``parent`` (chain.py: loading, the page index,
the same-process check) and image directories written atomically and walked down their links (imgdir.py)."""
