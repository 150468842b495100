//! Images for the campaign, in every format the worker decodes (JPEG, PNG, TIFF, BMP): good
//! samples, corrupt copies of them, headers that lie about their size, decompression bombs
//! (a few hundred kilobytes that decode to hundreds of megabytes) and extreme aspect ratios.

use std::collections::BTreeMap;
use std::io::Cursor;

use clipqc::proto::v1::{inspection_request::Image, RegionOfInterest};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{DynamicImage, ExtendedColorType, ImageEncoder, ImageFormat};

use super::cases::{request, Case, Expect, Kind, Rng, IMAGE, TOO_LARGE};

/// One 250×250 part image in each format.
pub struct Samples {
    pub jpeg: Vec<u8>,
    pub png: Vec<u8>,
    pub tiff: Vec<u8>,
    pub bmp: Vec<u8>,
}

impl Samples {
    pub fn from_jpeg(jpeg: &[u8]) -> Self {
        let img = image::load_from_memory(jpeg).unwrap();
        Self {
            jpeg: jpeg.to_vec(),
            png: encode(&img, ImageFormat::Png),
            tiff: encode(&img, ImageFormat::Tiff),
            bmp: encode(&img, ImageFormat::Bmp),
        }
    }
}

pub fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn gray(w: u32, h: u32) -> DynamicImage {
    DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([((x * 7 + y * 13) % 251) as u8])
    }))
}

/// An all-zero grey PNG, compressed as hard as the encoder goes: 10000×10000 is 100 MB of
/// pixels in about 100 kB.
pub fn zero_png(w: u32, h: u32) -> Vec<u8> {
    let pixels = vec![0u8; w as usize * h as usize];
    let mut out = Vec::new();
    PngEncoder::new_with_quality(&mut out, CompressionType::Best, FilterType::NoFilter)
        .write_image(&pixels, w, h, ExtendedColorType::L8)
        .unwrap();
    out
}

/// Each chunk of a PNG: (offset of its length field, type, data).
fn chunks(png: &[u8]) -> Vec<(usize, [u8; 4], &[u8])> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        let kind: [u8; 4] = png[at + 4..at + 8].try_into().unwrap();
        let end = (at + 8 + len).min(png.len());
        out.push((at, kind, &png[at + 8..end]));
        at = end + 4;
    }
    out
}

/// The zlib stream of a PNG (its IDAT chunks). For an all-zero NoFilter PNG of w×h it
/// inflates to h × (w + 1) zero bytes: a TIFF strip of (w + 1)×h grey pixels.
pub fn idat(png: &[u8]) -> Vec<u8> {
    chunks(png)
        .into_iter()
        .filter(|(_, kind, _)| kind == b"IDAT")
        .flat_map(|(_, _, data)| data.to_vec())
        .collect()
}

/// `png` with its IHDR saying `w`×`h` (and bit depth, colour type if given), CRC fixed.
pub fn png_ihdr(png: &[u8], w: u32, h: u32, depth_color: Option<(u8, u8)>) -> Vec<u8> {
    let mut out = png.to_vec();
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    if let Some((depth, color)) = depth_color {
        out[24] = depth;
        out[25] = color;
    }
    let crc = crc32fast::hash(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

/// `jpeg` with its frame header (SOFn) saying `w`×`h`; the scan data stays the small one's.
pub fn jpeg_sof(jpeg: &[u8], w: u16, h: u16) -> Vec<u8> {
    let mut out = jpeg.to_vec();
    let mut at = 2;
    while at + 9 < out.len() && out[at] == 0xff {
        let marker = out[at + 1];
        let len = u16::from_be_bytes([out[at + 2], out[at + 3]]) as usize;
        if (0xc0..=0xcf).contains(&marker) && ![0xc4, 0xc8, 0xcc].contains(&marker) {
            out[at + 5..at + 7].copy_from_slice(&h.to_be_bytes());
            out[at + 7..at + 9].copy_from_slice(&w.to_be_bytes());
            return out;
        }
        at += 2 + len;
    }
    panic!("no SOF marker in the sample JPEG");
}

/// A little-endian baseline TIFF, one strip, tags settable one by one (types: 3 SHORT, 4
/// LONG; one value each, stored in the entry).
pub struct Tiff {
    tags: BTreeMap<u16, (u16, u32)>,
    data: Vec<u8>,
}

impl Tiff {
    /// Grey, 8 bits, `compression` (1 none, 8 deflate, 32773 PackBits).
    pub fn gray(w: u32, h: u32, compression: u32, data: Vec<u8>) -> Self {
        let tags = [
            (256, (4, w)),
            (257, (4, h)),
            (258, (3, 8)),
            (259, (3, compression)),
            (262, (3, 1)),
            (277, (3, 1)),
            (278, (4, h)),
            (279, (4, data.len() as u32)),
        ]
        .into_iter()
        .collect();
        Self { tags, data }
    }

    pub fn set(mut self, tag: u16, kind: u16, value: u32) -> Self {
        self.tags.insert(tag, (kind, value));
        self
    }

    pub fn build(mut self) -> Vec<u8> {
        let count = self.tags.len() + usize::from(!self.tags.contains_key(&273));
        let data_at = (8 + 2 + 12 * count + 4) as u32;
        self.tags.entry(273).or_insert((4, data_at));
        let mut out = b"II*\0".to_vec();
        out.extend(8u32.to_le_bytes());
        out.extend((self.tags.len() as u16).to_le_bytes());
        for (tag, (kind, value)) in &self.tags {
            out.extend(tag.to_le_bytes());
            out.extend(kind.to_le_bytes());
            out.extend(1u32.to_le_bytes());
            out.extend(value.to_le_bytes());
        }
        out.extend(0u32.to_le_bytes());
        out.extend(&self.data);
        out
    }
}

/// A BMP with a BITMAPINFOHEADER, a grey palette of `palette` entries (also the "colours
/// used" field) and `data` as the pixel array.
pub fn bmp(w: i32, h: i32, bpp: u16, compression: u32, palette: u32, data: &[u8]) -> Vec<u8> {
    let entries = palette.min(256);
    let pixels_at = 14 + 40 + 4 * entries;
    let mut out = b"BM".to_vec();
    out.extend((pixels_at + data.len() as u32).to_le_bytes());
    out.extend([0; 4]);
    out.extend(pixels_at.to_le_bytes());
    out.extend(40u32.to_le_bytes());
    out.extend(w.to_le_bytes());
    out.extend(h.to_le_bytes());
    out.extend(1u16.to_le_bytes());
    out.extend(bpp.to_le_bytes());
    out.extend(compression.to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out.extend([0; 8]);
    out.extend(palette.to_le_bytes());
    out.extend(0u32.to_le_bytes());
    for i in 0..entries {
        let v = i as u8;
        out.extend([v, v, v, 0]);
    }
    out.extend(data);
    out
}

fn inline(kind: Kind, what: String, bytes: Vec<u8>, e: Expect) -> Case {
    let id = format!("{}-{}", kind, what.replace(' ', "_"));
    Case::proto(kind, what, &request(id, Image::InlineData(bytes)), e)
}

/// `n` corrupt copies of `good`: cut short, bits flipped in the header or the data, only
/// the signature, garbage after the signature or the end, ranges zeroed or swapped.
pub fn corrupt(rng: &mut Rng, kind: Kind, good: &[u8], n: usize, out: &mut Vec<Case>) {
    let len = good.len();
    for i in 0..n {
        let mut b = good.to_vec();
        let what = match i % 9 {
            0 => {
                b.truncate(1 + rng.below(len / 2));
                "cut in the first half"
            }
            1 => {
                b.truncate(len / 2 + rng.below(len / 2));
                "cut in the second half"
            }
            2 => {
                for _ in 0..1 + rng.below(16) {
                    let j = 64 + rng.below(len - 64);
                    b[j] ^= 1 << rng.below(8);
                }
                "bits flipped in the data"
            }
            3 => {
                for _ in 0..1 + rng.below(4) {
                    let j = rng.below(64);
                    b[j] = rng.next_u64() as u8;
                }
                "header bytes changed"
            }
            4 => {
                b.truncate(8);
                "signature only"
            }
            5 => {
                b.truncate(8);
                b.extend(rng.junk(1, 2001));
                "signature and garbage"
            }
            6 => {
                let at = 32 + rng.below(len - 32);
                let end = (at + 1 + rng.below(4096)).min(len);
                b[at..end].fill(0);
                "range zeroed"
            }
            7 => {
                b.extend(rng.junk(1, 4097));
                "garbage after the end"
            }
            _ => {
                let (x, y) = (64 + rng.below(len - 320), 64 + rng.below(len - 320));
                let piece = b[x..x + 256].to_vec();
                b.copy_within(y..y + 256, x);
                b[y..y + 256].copy_from_slice(&piece);
                "blocks swapped"
            }
        };
        let what = format!("{what} #{i}");
        out.push(inline(kind, what, b, Expect::pass_or(IMAGE)));
    }
}

/// Headers that lie (60000×60000, 0×0, u32::MAX wide, impossible depths) and real bombs
/// (files of a few hundred kilobytes that decode to 100–400 MB), in each format.
pub fn bombs(samples: &Samples, out: &mut Vec<Case>) {
    let e = Expect::pass_or(IMAGE);
    // The scan of a 250×250 image under a bigger frame header: libjpeg fills the rest with
    // grey, which must not be inspected as a part (it was, before the worker refused it).
    let lying = Expect::error(IMAGE);
    let j = &samples.jpeg;
    for (w, h, times) in [
        (65535, 65535, 1),
        (16384, 16384, 1),
        (12000, 12000, 2),
        (8000, 8000, 2),
        (16000, 1, 1),
        (1, 60000, 1),
        (0, 1, 1),
    ] {
        for t in 0..times {
            let what = format!("JPEG frame header says {w}x{h} #{t}");
            out.push(inline(Kind::BombJpeg, what, jpeg_sof(j, w, h), lying));
        }
    }
    let zero = zero_png(10_000, 10_000);
    for t in 0..3 {
        let what = format!("all-zero 10000x10000 PNG of {} bytes #{t}", zero.len());
        out.push(inline(Kind::BombPng, what, zero.clone(), e));
    }
    for (w, h, dc) in [
        (60000, 60000, None),
        (16384, 16384, Some((16, 6))),
        (u32::MAX, 1, None),
        (16000, 16000, None),
        (10_000, 10_000, Some((3, 0))),
        (10_000, 10_000, Some((8, 5))),
    ] {
        let what = format!("PNG header says {w}x{h} {dc:?}");
        out.push(inline(Kind::BombPng, what, png_ihdr(&zero, w, h, dc), e));
    }
    out.push(inline(
        Kind::BombPng,
        "all-zero 16384x2 PNG".into(),
        zero_png(16384, 2),
        Expect::error(&[TOO_LARGE]),
    ));
    // Deflate inflating to 10000 × 10001 zero bytes: a 10001×10000 grey strip.
    let deflate = idat(&zero);
    for t in 0..3 {
        let tiff = Tiff::gray(10_001, 10_000, 8, deflate.clone()).build();
        let what = format!("deflate TIFF 10001x10000 of {} bytes #{t}", tiff.len());
        out.push(inline(Kind::BombTiff, what, tiff, e));
    }
    let strip = vec![0u8; 100];
    let tiffs = [
        (
            "says 60000x60000",
            Tiff::gray(60000, 60000, 1, strip.clone()),
        ),
        (
            "says 12000x12000, 100 bytes",
            Tiff::gray(12000, 12000, 1, strip.clone()),
        ),
        (
            "strip count says 144 MB",
            Tiff::gray(12000, 12000, 1, strip.clone()).set(279, 4, 144_000_000),
        ),
        (
            "strip offset u32::MAX",
            Tiff::gray(100, 100, 1, strip.clone()).set(273, 4, u32::MAX),
        ),
        (
            "rows per strip 0",
            Tiff::gray(100, 100, 1, strip.clone()).set(278, 4, 0),
        ),
        (
            "tiles of 0x0",
            Tiff::gray(100, 100, 1, strip.clone())
                .set(322, 3, 0)
                .set(323, 3, 0)
                .set(324, 4, 8)
                .set(325, 4, 100),
        ),
        (
            "5000 samples per pixel",
            Tiff::gray(100, 100, 1, strip.clone()).set(277, 3, 5000),
        ),
        (
            "64-bit RGBA 10000x10000",
            Tiff::gray(10_000, 10_000, 1, strip.clone())
                .set(258, 3, 64)
                .set(277, 3, 4)
                .set(262, 3, 2),
        ),
        (
            "PackBits says 8000x8000",
            Tiff::gray(8000, 8000, 32773, vec![0x81, 0]),
        ),
    ];
    for (what, tiff) in tiffs {
        out.push(inline(
            Kind::BombTiff,
            format!("TIFF {what}"),
            tiff.build(),
            e,
        ));
    }
    // RLE8 "end of bitmap" at once: the decoder fills the rest of the frame.
    let end = [0u8, 1];
    let deltas: Vec<u8> = [0u8, 2, 255, 255].repeat(1000);
    let bmps = [
        (
            "RLE8 10000x10000 ends at once",
            bmp(10_000, 10_000, 8, 1, 256, &end),
        ),
        (
            "RLE8 10000x10000 ends at once (2)",
            bmp(10_000, 10_000, 8, 1, 256, &end),
        ),
        (
            "RLE8 16000x16000 ends at once",
            bmp(16_000, 16_000, 8, 1, 256, &end),
        ),
        ("RLE8 8000x8000 deltas", bmp(8000, 8000, 8, 1, 256, &deltas)),
        (
            "RLE4 10000x10000 ends at once",
            bmp(10_000, 10_000, 4, 2, 16, &end),
        ),
        ("24-bit 60000 wide", bmp(60000, 10, 24, 0, 0, &[0; 64])),
        ("height i32::MIN", bmp(10, i32::MIN, 24, 0, 0, &[0; 64])),
        ("width i32::MIN", bmp(i32::MIN, 10, 24, 0, 0, &[0; 64])),
        ("width -1", bmp(-1, 10, 24, 0, 0, &[0; 64])),
        (
            "top-down 16000x16000",
            bmp(16000, -16000, 24, 0, 0, &[0; 64]),
        ),
        ("0 bits per pixel", bmp(10, 10, 0, 0, 0, &[0; 64])),
        ("64 bits per pixel", bmp(10, 10, 64, 0, 0, &[0; 64])),
        ("2^31 colours used", bmp(10, 10, 8, 0, 1 << 31, &[0; 100])),
    ];
    for (what, b) in bmps {
        out.push(inline(Kind::BombBmp, format!("BMP {what}"), b, e));
    }
}

/// Frames and regions far longer than wide (refused as TOO_LARGE past
/// `preprocess.limits.max_aspect_ratio`, 32 by default) and one-pixel regions.
pub fn aspect(samples: &Samples, out: &mut Vec<Case>) {
    let k = Kind::Aspect;
    let too_long = Expect::error(&[TOO_LARGE]);
    for (w, h, format) in [
        (16000, 1, ImageFormat::Png),
        (1, 16000, ImageFormat::Png),
        (16000, 2, ImageFormat::Png),
        (4000, 100, ImageFormat::Png),
        (33, 1, ImageFormat::Png),
        (16000, 8, ImageFormat::Jpeg),
        (8, 16000, ImageFormat::Jpeg),
        (16000, 1, ImageFormat::Bmp),
        (1, 16000, ImageFormat::Bmp),
        (16000, 1, ImageFormat::Tiff),
        (1, 16000, ImageFormat::Tiff),
    ] {
        for t in 0..2 {
            let what = format!("{format:?} {w}x{h} #{t}");
            out.push(inline(k, what, encode(&gray(w, h), format), too_long));
        }
    }
    for (w, h) in [(3200, 100), (32, 1), (1, 32)] {
        let what = format!("PNG {w}x{h} (32:1, allowed)");
        out.push(inline(
            k,
            what,
            encode(&gray(w, h), ImageFormat::Png),
            Expect::PASS,
        ));
    }
    let regions = [
        ((0, 0, 250, 1), too_long),
        ((0, 0, 1, 250), too_long),
        ((0, 0, 66, 2), too_long),
        ((0, 0, 64, 2), Expect::PASS),
        ((0, 0, 2, 1), Expect::PASS),
        ((0, 0, 1, 1), Expect::PASS),
        ((124, 124, 1, 1), Expect::PASS),
        ((249, 0, 1, 1), Expect::PASS),
        ((0, 249, 1, 1), Expect::PASS),
    ];
    for (format, bytes) in [
        ("JPEG", &samples.jpeg),
        ("PNG", &samples.png),
        ("TIFF", &samples.tiff),
        ("BMP", &samples.bmp),
    ] {
        for ((x, y, width, height), e) in regions {
            let mut r = request(
                format!("aspect-{format}-{x}-{y}-{width}x{height}"),
                Image::InlineData(bytes.clone()),
            );
            r.region = Some(RegionOfInterest {
                x,
                y,
                width,
                height,
            });
            let what = format!("{format} region {x},{y} {width}x{height}");
            out.push(Case::proto(k, what, &r, e));
        }
    }
}
