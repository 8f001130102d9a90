"""Data sets on disk: `mvtec` (the MVTec-AD layout: listing and checking) and `synthetic`
(a generated set in that layout, with exact defect masks)."""
