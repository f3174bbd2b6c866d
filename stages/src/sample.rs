//! The in-flight example: what the CPU chain produces for one sample, in plain
//! vectors with their shapes, so the sink turns it into tensors without the
//! data stages knowing about candle.

use serde::{Deserialize, Serialize};

/// An 8-bit image of `C` interleaved channels, rows top to bottom (H x W x C).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Image8<const C: usize> {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * C` bytes.
    pub data: Vec<u8>,
}

/// An 8-bit RGB image (R G B per pixel): what the stages decode and crop.
pub type Rgb8 = Image8<3>;

/// An 8-bit one-channel image: a one-channel run's decode and crop
/// (`stages.channels: 1`), the luma of a colour source.
pub type Grey8 = Image8<1>;

impl<const C: usize> Image8<C> {
    /// An all-black image.
    pub fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height * C],
        }
    }
}

impl Grey8 {
    /// Three equal channels (lossless: the luma of (v, v, v) is v).
    pub fn to_rgb(&self) -> Rgb8 {
        Rgb8 {
            width: self.width,
            height: self.height,
            data: self.data.iter().flat_map(|&v| [v; 3]).collect(),
        }
    }
}

impl Rgb8 {
    /// The luma plane.
    pub fn luma(&self) -> Grey8 {
        Grey8 {
            width: self.width,
            height: self.height,
            data: self.data.chunks_exact(3).map(luma).collect(),
        }
    }

    /// Pixel (x, y) channel c.
    #[inline]
    pub fn at(&self, x: usize, y: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * 3 + c]
    }

    /// The image with every pixel's three channels set to its [`luma`].
    pub fn grey(&self) -> Rgb8 {
        Rgb8 {
            width: self.width,
            height: self.height,
            data: self.data.chunks_exact(3).flat_map(|p| [luma(p); 3]).collect(),
        }
    }
}

/// ITU-R BT.601 luma of an RGB pixel in 16-bit fixed point, as libjpeg's and
/// PIL's `L`; exact on grey pixels: (v, v, v) gives v.
#[inline]
pub fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// A crop rectangle in source pixels (torchvision's `i, j, h, w` as top, left, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// How the view the model sees was cut from the source image (`KEY.view.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct View {
    /// Source image width.
    pub source_width: usize,
    /// Source image height.
    pub source_height: usize,
    /// The crop in source pixels.
    pub crop: CropBox,
    /// Mirrored left-right after resizing.
    pub flip: bool,
    /// Output size (square side, pixels).
    pub size: usize,
}

/// MAE random masking of one sample. "0 is keep, 1 is remove" (models_mae.py).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Mask {
    /// Per patch, row-major: 1 = masked (removed), 0 = visible.
    pub mask: Vec<u8>,
    /// The kept patch indices in shuffle order (`len_keep` of them).
    pub ids_keep: Vec<u32>,
    /// Position of each patch in the shuffle (argsort of the shuffle).
    pub ids_restore: Vec<u32>,
}

/// One per-patch target F(x): `values` is `patches x dims`, row-major.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Target {
    /// `pixel`, `hog` or `canny`.
    pub kind: String,
    /// Values per patch.
    pub dims: usize,
    /// `patches * dims` values.
    pub values: Vec<f32>,
}

/// Everything the model is fed for one sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Example {
    /// The sample key.
    pub key: String,
    /// `KEY.cls` when present.
    pub class: Option<i64>,
    /// How the view was cut.
    pub view: View,
    /// The view as u8 RGB (size x size x 3), before normalization.
    pub pixels: Rgb8,
    /// The normalized view as the model sees it, C x H x W (C = `stages.channels`).
    pub image: Vec<f32>,
    /// Patch side in pixels.
    pub patch: usize,
    /// Masking of the `(size / patch)^2` patches.
    pub mask: Mask,
    /// The smoothed target x̂, normalized as the view, C x H x W.
    pub smooth: Vec<f32>,
    /// Per-patch targets, in the order of the config's `targets.kinds`.
    pub targets: Vec<Target>,
}

impl Example {
    /// Number of patches.
    pub fn num_patches(&self) -> usize {
        let g = self.view.size / self.patch.max(1);
        g * g
    }
}

/// Why a stage rejected a sample. The chain adds the sample key and stage name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StageError {
    /// No `jpg`, `jpeg` or `png` member in the sample.
    #[error("no image member (looked for jpg, jpeg, png)")]
    NoImage,
    /// Bytes that are not a decodable image.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// A format or variant the decoder does not handle.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// Declared size over the configured limit, checked before allocating.
    #[error("image {width}x{height} is over the limit of {limit} pixels (decompression bomb?)")]
    TooLarge {
        /// Declared width.
        width: usize,
        /// Declared height.
        height: usize,
        /// `decode.max_pixels`.
        limit: u64,
    },
    /// A configuration that cannot work (patch size not dividing the image...).
    #[error("bad stage config: {0}")]
    Config(String),
    /// A target that should come from the target cache cannot be read from it.
    #[error("target cache: {0}")]
    Cache(String),
}
