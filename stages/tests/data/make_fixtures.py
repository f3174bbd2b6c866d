"""Make the small image fixtures of stages/tests/data (run with Pillow installed).

cmyk.jpg: a 32x32 CMYK JPEG (Pillow writes Adobe APP14, inverted CMYK), four
16x16 quadrants of solid colors whose RGB is the same under every CMYK->RGB
convention: white (0,0,0,0), red (0,255,255,0), blue (255,255,0,0), black (0,0,0,255).
"""
from PIL import Image

quadrants = [(0, 0, 0, 0), (0, 255, 255, 0), (255, 255, 0, 0), (0, 0, 0, 255)]
im = Image.new("CMYK", (32, 32))
for q, color in enumerate(quadrants):
    x0, y0 = (q % 2) * 16, (q // 2) * 16
    im.paste(color, (x0, y0, x0 + 16, y0 + 16))
im.save("cmyk.jpg", quality=95)
print(Image.open("cmyk.jpg").mode, Image.open("cmyk.jpg").convert("RGB").getpixel((20, 4)))
