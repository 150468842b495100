//! What the `tiff` crate will do with a TIFF, read ahead from its first image file directory
//! (IFD0) without decoding anything: the compression, and for a JPEG-compressed TIFF the
//! largest frame its JPEG decoder could be made to decode.
//!
//! Why the frame: the `tiff` crate hands each JPEG strip or tile to zune-jpeg as it is, and
//! zune-jpeg allocates the frame *that* data declares (up to 16384×16384), whatever size the
//! TIFF gives the strip. A 1 KB TIFF of 24×16 pixels whose strip declared 8216×16 made `run`
//! hold ten times what `plan` said (found by `fuzz/`'s preprocess target); one declaring
//! 16000×16000 would have had it allocate 768 MB. [`super::plan`] counts the frame, and the
//! limits refuse it.
//!
//! The frame is found the way a lenient decoder could find it, not the way a strict one
//! would: every byte run anywhere in the JPEG data that reads as a start-of-frame header a
//! decoder accepts counts (zune-jpeg skips bytes it does not understand between segments, so
//! following segment lengths could miss one). A chance match in other bytes only makes the
//! plan larger. JPEG tables (`JPEGTables`) are joined to each strip as the `tiff` crate joins
//! them, so a header split across the two is seen as well.

use std::collections::BTreeMap;

const COMPRESSION: u16 = 259;
const STRIP_OFFSETS: u16 = 273;
const TILE_OFFSETS: u16 = 324;
const JPEG_TABLES: u16 = 347;

/// `Compression` of JPEG data as TIFF technote 2 defines it: the one the `tiff` crate decodes
/// (with zune-jpeg).
pub(crate) const JPEG: u16 = 7;

/// A JPEG start-of-frame header: what a decoder allocates for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JpegFrame {
    pub width: u16,
    pub height: u16,
    pub components: u8,
}

impl JpegFrame {
    /// Samples per pixel of the decoded frame: the components, but at least three (zune-jpeg
    /// decodes two or more than four components to its default three-channel colour space).
    pub fn channels(&self) -> u64 {
        u64::from(self.components).max(3)
    }

    /// What decoding it holds at most: the output and, for a progressive frame, two bytes a
    /// coefficient for every component, in whole MCUs (at most 32 pixels a side).
    pub fn decoded_bytes(&self) -> u64 {
        let pad = |side: u16| u64::from(side).next_multiple_of(32);
        3 * pad(self.width) * pad(self.height) * self.channels()
    }
}

/// Start-of-frame markers (SOF0–SOF15 but DHT, JPG and DAC, which share the range).
fn is_sof(b: u8) -> bool {
    matches!(b, 0xC0..=0xCF) && !matches!(b, 0xC4 | 0xC8 | 0xCC)
}

/// The frame of `data[at..]` if a decoder could read a start-of-frame header there (marker,
/// length 8 + 3 × components, 8-bit precision, non-zero sizes): the checks zune-jpeg makes
/// before it allocates.
fn frame_at(data: &[u8], at: usize) -> Option<JpegFrame> {
    let h = data.get(at..at.checked_add(9)?)?;
    let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let (length, precision) = (u16_at(1), h[3]);
    let (height, width, components) = (u16_at(4), u16_at(6), h[8]);
    (is_sof(h[0])
        && precision == 8
        && width > 0
        && height > 0
        && components > 0
        && length == 8 + 3 * u16::from(components))
    .then_some(JpegFrame {
        width,
        height,
        components,
    })
}

/// The frame anywhere in `data` whose decoding holds the most.
pub(crate) fn largest_frame(data: &[u8]) -> Option<JpegFrame> {
    (0..data.len())
        .filter(|&at| is_sof(data[at]))
        .filter_map(|at| frame_at(data, at))
        .max_by_key(JpegFrame::decoded_bytes)
}

/// A JPEG-compressed TIFF whose tables could start a frame header with its strips' bytes, but
/// whose strips (or tiles) are not where its tag says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("TIFF tag {tag}: the JPEG strips cannot be located")]
pub(crate) struct StripsNotFound {
    /// `StripOffsets` (273) or `TileOffsets` (324).
    pub tag: u16,
}

/// IFD0's entries as the `tiff` crate keeps them: by tag, the last of duplicates winning,
/// entries of a type it does not know skipped.
pub(crate) struct Ifd<'a> {
    bytes: &'a [u8],
    big_endian: bool,
    bigtiff: bool,
    entries: BTreeMap<u16, Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    kind: u16,
    count: u64,
    /// Where the value (when it fits) or the offset of the values is.
    at: usize,
}

fn to_usize(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl<'a> Ifd<'a> {
    /// `None` when `bytes` is not a TIFF whose first directory can be read whole (the `tiff`
    /// crate refuses those too).
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let big_endian = match bytes.get(..2)? {
            b"II" => false,
            b"MM" => true,
            _ => return None,
        };
        let mut ifd = Self {
            bytes,
            big_endian,
            bigtiff: false,
            entries: BTreeMap::new(),
        };
        let (count, first, entry_size) = match ifd.uint(2, 2)? {
            42 => {
                let at = to_usize(ifd.uint(4, 4)?)?;
                (ifd.uint(at, 2)?, at.checked_add(2)?, 12)
            }
            43 => {
                ifd.bigtiff = true;
                let at = to_usize(ifd.uint(8, 8)?)?;
                (ifd.uint(at, 8)?, at.checked_add(8)?, 20)
            }
            _ => return None,
        };
        let value_size = ifd.value_size();
        // Each entry must be in the file, so this ends after at most len / 12 rounds.
        for i in 0..count {
            let at = first.checked_add(to_usize(i)?.checked_mul(entry_size)?)?;
            let tag = ifd.uint(at, 2)? as u16;
            let kind = ifd.uint(at + 2, 2)? as u16;
            let (count, value) = if ifd.bigtiff {
                (ifd.uint(at + 4, 8)?, at + 12)
            } else {
                (ifd.uint(at + 4, 4)?, at + 8)
            };
            ifd.bytes.get(value..value.checked_add(value_size)?)?;
            if matches!(kind, 1..=13 | 16..=18) {
                ifd.entries.insert(
                    tag,
                    Entry {
                        kind,
                        count,
                        at: value,
                    },
                );
            }
        }
        Some(ifd)
    }

    /// The first image's `Compression`, as the `tiff` crate reads it.
    pub fn compression(&self) -> Option<u16> {
        self.uints(COMPRESSION)?
            .first()
            .and_then(|&c| u16::try_from(c).ok())
    }

    /// For a JPEG-compressed TIFF, the largest frame its JPEG decoder could be made to decode
    /// (`None` when no bytes read as one). Errs when the JPEG tables end in what could start a
    /// frame header but the strips they are joined to cannot be located.
    pub fn largest_jpeg_frame(&self) -> Result<Option<JpegFrame>, StripsNotFound> {
        // The tables and every strip are bytes of the file, read as they stand...
        let mut largest = largest_frame(self.bytes);
        let Some(tables) = self.bytes_of(JPEG_TABLES).filter(|t| t.len() >= 2) else {
            return Ok(largest);
        };
        // ...except where the tables, without their last two bytes (the end-of-image marker),
        // are followed by each strip from its third byte on.
        let head = &tables[..tables.len() - 2];
        let tail = &head[head.len().saturating_sub(8)..];
        if !tail.iter().any(|&b| is_sof(b)) {
            return Ok(largest);
        }
        let mut starts = Vec::new();
        for tag in [STRIP_OFFSETS, TILE_OFFSETS] {
            if self.entries.contains_key(&tag) {
                starts.extend(self.uints(tag).ok_or(StripsNotFound { tag })?);
            }
        }
        for start in starts {
            let strip = to_usize(start)
                .and_then(|s| s.checked_add(2))
                .and_then(|s| self.bytes.get(s..))
                .unwrap_or_default();
            let mut joined = tail.to_vec();
            joined.extend_from_slice(&strip[..strip.len().min(8)]);
            largest = [largest, largest_frame(&joined)]
                .into_iter()
                .flatten()
                .max_by_key(JpegFrame::decoded_bytes);
        }
        Ok(largest)
    }

    fn value_size(&self) -> usize {
        if self.bigtiff {
            8
        } else {
            4
        }
    }

    fn uint(&self, at: usize, size: usize) -> Option<u64> {
        let b = self.bytes.get(at..at.checked_add(size)?)?;
        Some(if self.big_endian {
            b.iter().fold(0, |v, &b| v << 8 | u64::from(b))
        } else {
            b.iter().rev().fold(0, |v, &b| v << 8 | u64::from(b))
        })
    }

    /// Where an entry's values start: in the entry when they fit, else at its offset.
    fn values_at(&self, e: &Entry, size: usize) -> Option<usize> {
        if e.count.checked_mul(size as u64)? <= self.value_size() as u64 {
            Some(e.at)
        } else {
            to_usize(self.uint(e.at, self.value_size())?)
        }
    }

    /// A tag's values as unsigned integers (BYTE, SHORT, LONG, IFD, LONG8, IFD8); `None` when
    /// absent, of another type, or not all in the file.
    fn uints(&self, tag: u16) -> Option<Vec<u64>> {
        let e = self.entries.get(&tag)?;
        let size = match e.kind {
            1 => 1,
            3 => 2,
            4 | 13 => 4,
            16 | 18 => 8,
            _ => return None,
        };
        let start = self.values_at(e, size)?;
        (0..to_usize(e.count)?)
            .map(|i| self.uint(start.checked_add(i.checked_mul(size)?)?, size))
            .collect()
    }

    /// A tag's bytes (BYTE, ASCII, SBYTE, UNDEFINED); `None` when absent, of another type or
    /// not all in the file.
    fn bytes_of(&self, tag: u16) -> Option<&'a [u8]> {
        let e = self.entries.get(&tag)?;
        if !matches!(e.kind, 1 | 2 | 6 | 7) {
            return None;
        }
        let start = self.values_at(e, 1)?;
        self.bytes
            .get(start..start.checked_add(to_usize(e.count)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_found_wherever_a_decoder_could_read_one() {
        // SOF0, length 17, 8-bit, 16 high, 8216 wide, 3 components.
        let sof = [0xC0, 0, 17, 8, 0, 16, 0x20, 0x18, 3];
        let mut data = vec![0x12; 40];
        data[10..19].copy_from_slice(&sof);
        let frame = largest_frame(&data).unwrap();
        assert_eq!((frame.width, frame.height, frame.components), (8216, 16, 3));
        // 8224 × 32 padded, three channels, output and coefficients.
        assert_eq!(frame.decoded_bytes(), 3 * 8224 * 32 * 3);
        // Not a frame a decoder takes: 12-bit precision, a length that does not match.
        let mut twelve = sof;
        twelve[3] = 12;
        assert_eq!(largest_frame(&twelve), None);
        let mut length = sof;
        length[2] = 18;
        assert_eq!(largest_frame(&length), None);
        // DHT (0xC4) is not a frame.
        let mut dht = sof;
        dht[0] = 0xC4;
        assert_eq!(largest_frame(&dht), None);
    }

    #[test]
    fn strips_that_cannot_be_located_are_an_error_naming_the_tag() {
        // Little-endian TIFF, IFD0 at 8 with two entries: StripOffsets as a RATIONAL (no
        // offsets to read) and JPEGTables whose end could start a frame header.
        let entry = |tag: u16, kind: u16, count: u32, value: u32| {
            [tag.to_le_bytes(), kind.to_le_bytes()]
                .concat()
                .into_iter()
                .chain(count.to_le_bytes())
                .chain(value.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let tables = [0xFF, 0xD8, 0xFF, 0xC0, 0, 0, 0, 0, 0, 0, 0xFF, 0xD9];
        let mut tiff = b"II".to_vec();
        tiff.extend(42u16.to_le_bytes());
        tiff.extend(8u32.to_le_bytes());
        tiff.extend(2u16.to_le_bytes());
        tiff.extend(entry(STRIP_OFFSETS, 5, 1, 0));
        tiff.extend(entry(JPEG_TABLES, 7, tables.len() as u32, 38));
        tiff.extend(0u32.to_le_bytes());
        tiff.extend(tables);
        let ifd = Ifd::parse(&tiff).expect("a readable IFD0");
        let err = ifd.largest_jpeg_frame().unwrap_err();
        assert_eq!(err, StripsNotFound { tag: STRIP_OFFSETS });
        assert_eq!(
            err.to_string(),
            "TIFF tag 273: the JPEG strips cannot be located"
        );
    }
}
