"""Image bytes, pure: PNG structure (completeness, size), PNG text chunks, and uploaded images
checked and made into the files a script reads.

May use: fields and errors only; everything above may use it."""
