"""The napari side: reader, writer, sample data (npe2 contributions) and the dock widgets (`widgets`). Qt and napari
are imported only here.
"""
