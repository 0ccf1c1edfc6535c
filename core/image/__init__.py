"""Numpy maths on one cell: the crop rule and crop cache, stain/colour/texture, hand-crafted features."""
