//! Apple's LZ4 framing, what `NSData.compressed(using: .lz4)` and the
//! Compression framework's `COMPRESSION_LZ4` produce and what Tart uses for
//! each disk layer (tart-oci.md §4.1).
//!
//! A stream is a sequence of blocks, little-endian integers:
//! * `bv41` decoded-size encoded-size, then an LZ4 *block* (not an LZ4
//!   frame) of encoded-size bytes. A block may copy from the last 64 KiB of
//!   the previous blocks' output.
//! * `bv4-` size, then size bytes stored as they are.
//! * `bv4$` end of stream; nothing may follow.
//!
//! The LZ4 block codec itself is `lz4_flex`'s.

use std::io::{self, Read};

const MAGIC_COMPRESSED: [u8; 4] = *b"bv41";
const MAGIC_STORED: [u8; 4] = *b"bv4-";
const MAGIC_END: [u8; 4] = *b"bv4$";

/// How far back an LZ4 match may reach.
const WINDOW: usize = 64 * 1024;

/// Input bytes per block when encoding; Apple's encoder is reported to use
/// the same, and any size decodes.
pub const ENCODE_BLOCK: usize = 64 * 1024;

/// The largest decoded block accepted: bounds what one header can make us
/// allocate. Apple's blocks are reported as 64 KiB; other writers of the
/// framing use up to 4 MiB (Aspose's default), so leave room beyond that.
pub const MAX_BLOCK: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Lz4Error {
    #[error("reading the compressed stream: {0}")]
    Io(#[source] io::Error),
    #[error("compressed stream ends inside a block (no end-of-stream marker)")]
    Truncated,
    #[error("unknown block magic {0:02x?} at compressed offset {1}")]
    BadMagic([u8; 4], u64),
    #[error("a block claims {0} decoded bytes, more than the {MAX_BLOCK} accepted")]
    BlockTooLarge(u64),
    #[error("a block claims {encoded} encoded bytes for {decoded} decoded bytes, more than LZ4 can need")]
    EncodedTooLarge { encoded: u64, decoded: u64 },
    #[error("a compressed block is corrupt: {0}")]
    Corrupt(String),
    #[error("a compressed block decodes to {got} bytes, its header says {want}")]
    SizeMismatch { got: usize, want: usize },
    #[error("the stream decodes to more than the {0} bytes it was declared to hold")]
    TooLong(u64),
    #[error("data follows the end-of-stream marker")]
    TrailingData,
    #[error("writing decoded data: {0}")]
    Sink(#[source] io::Error),
}

fn read_exact_or_truncated(r: &mut impl Read, buf: &mut [u8]) -> Result<(), Lz4Error> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Lz4Error::Truncated,
        _ => Lz4Error::Io(e),
    })
}

fn read_u32(r: &mut impl Read) -> Result<u32, Lz4Error> {
    let mut b = [0u8; 4];
    read_exact_or_truncated(r, &mut b)?;
    Ok(u32::from_le_bytes(b))
}

/// Decodes one stream from `input`, handing the decoded bytes to `sink` in
/// order, block by block. Fails, having decoded no more than `max_len`
/// bytes, if the stream would decode to more. Reads `input` to its end:
/// anything after the end marker is an error. Returns the decoded length.
pub fn decode<R: Read>(
    mut input: R,
    max_len: u64,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<u64, Lz4Error> {
    let mut history: Vec<u8> = Vec::with_capacity(WINDOW);
    let mut out: Vec<u8> = Vec::new();
    let mut encoded: Vec<u8> = Vec::new();
    let mut total: u64 = 0;
    let mut consumed: u64 = 0;
    loop {
        let mut magic = [0u8; 4];
        read_exact_or_truncated(&mut input, &mut magic)?;
        let at = consumed;
        consumed += 4;
        let decoded_len = match magic {
            MAGIC_END => break,
            MAGIC_COMPRESSED | MAGIC_STORED => u64::from(read_u32(&mut input)?),
            other => return Err(Lz4Error::BadMagic(other, at)),
        };
        if decoded_len > MAX_BLOCK as u64 {
            return Err(Lz4Error::BlockTooLarge(decoded_len));
        }
        if total + decoded_len > max_len {
            return Err(Lz4Error::TooLong(max_len));
        }
        let n = decoded_len as usize;
        out.resize(n, 0);
        if magic == MAGIC_STORED {
            read_exact_or_truncated(&mut input, &mut out)?;
            consumed += 4 + decoded_len;
        } else {
            let enc_len = u64::from(read_u32(&mut input)?);
            let bound = lz4_flex::block::get_maximum_output_size(n) as u64;
            if enc_len > bound {
                return Err(Lz4Error::EncodedTooLarge {
                    encoded: enc_len,
                    decoded: decoded_len,
                });
            }
            encoded.resize(enc_len as usize, 0);
            read_exact_or_truncated(&mut input, &mut encoded)?;
            consumed += 8 + enc_len;
            let got = lz4_flex::block::decompress_into_with_dict(&encoded, &mut out, &history)
                .map_err(|e| Lz4Error::Corrupt(e.to_string()))?;
            if got != n {
                return Err(Lz4Error::SizeMismatch { got, want: n });
            }
        }
        sink(&out).map_err(Lz4Error::Sink)?;
        total += decoded_len;
        // Keep the last WINDOW bytes of output for the next block.
        if out.len() >= WINDOW {
            history.clear();
            history.extend_from_slice(&out[out.len() - WINDOW..]);
        } else {
            let keep = (WINDOW - out.len()).min(history.len());
            history.drain(..history.len() - keep);
            history.extend_from_slice(&out);
        }
    }
    let mut probe = [0u8; 1];
    loop {
        match input.read(&mut probe) {
            Ok(0) => return Ok(total),
            Ok(_) => return Err(Lz4Error::TrailingData),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Lz4Error::Io(e)),
        }
    }
}

/// Appends `input` to `out` as one block: `bv41` if LZ4 shrinks it,
/// else `bv4-`. Blocks never refer to earlier ones, which every decoder of
/// the framing accepts.
fn encode_block(input: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    let bound = lz4_flex::block::get_maximum_output_size(input.len());
    out.resize(start + 12 + bound, 0);
    match lz4_flex::block::compress_into(input, &mut out[start + 12..]) {
        Ok(n) if n < input.len() => {
            out[start..start + 4].copy_from_slice(&MAGIC_COMPRESSED);
            out[start + 4..start + 8].copy_from_slice(&(input.len() as u32).to_le_bytes());
            out[start + 8..start + 12].copy_from_slice(&(n as u32).to_le_bytes());
            out.truncate(start + 12 + n);
        }
        _ => {
            out.truncate(start);
            out.extend_from_slice(&MAGIC_STORED);
            out.extend_from_slice(&(input.len() as u32).to_le_bytes());
            out.extend_from_slice(input);
        }
    }
}

/// Reads `input` and yields it encoded as one stream, end marker included.
/// Deterministic: the same input always gives the same bytes.
pub struct EncodeReader<R> {
    input: R,
    block: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    done: bool,
}

impl<R: Read> EncodeReader<R> {
    pub fn new(input: R) -> Self {
        EncodeReader {
            input,
            block: vec![0; ENCODE_BLOCK],
            out: Vec::with_capacity(ENCODE_BLOCK + 64 * 1024),
            out_pos: 0,
            done: false,
        }
    }

    pub fn into_inner(self) -> R {
        self.input
    }
}

impl<R: Read> Read for EncodeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.out_pos == self.out.len() {
            if self.done {
                return Ok(0);
            }
            self.out.clear();
            self.out_pos = 0;
            let mut filled = 0;
            while filled < ENCODE_BLOCK {
                match self.input.read(&mut self.block[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                self.out.extend_from_slice(&MAGIC_END);
                self.done = true;
            } else {
                encode_block(&self.block[..filled], &mut self.out);
            }
        }
        let n = buf.len().min(self.out.len() - self.out_pos);
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}

/// Encodes `data` as one stream.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // Reading from a slice cannot fail.
    let _ = EncodeReader::new(data).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(stream: &[u8], max: u64) -> Result<Vec<u8>, Lz4Error> {
        let mut out = Vec::new();
        decode(stream, max, |b| {
            out.extend_from_slice(b);
            Ok(())
        })?;
        Ok(out)
    }

    /// Data with runs, text and noise so both block kinds appear.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u32 = 0x1234_5678;
        (0..len)
            .map(|i| match (i / 70_000) % 3 {
                0 => 0,
                1 => b"vmapple "[i % 8],
                _ => {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn encoded_streams_decode_to_their_input() {
        for len in [
            0,
            1,
            ENCODE_BLOCK - 1,
            ENCODE_BLOCK,
            3 * ENCODE_BLOCK + 17,
            300_000,
        ] {
            let data = sample(len);
            let stream = encode(&data);
            assert_eq!(&stream[stream.len() - 4..], b"bv4$");
            assert_eq!(decode_all(&stream, len as u64).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn incompressible_blocks_are_stored() {
        let data = sample(3 * 70_000)[140_000..].to_vec();
        let stream = encode(&data);
        assert_eq!(&stream[..4], b"bv4-");
        assert_eq!(decode_all(&stream, data.len() as u64).unwrap(), data);
    }

    /// A hand-made stream whose second block copies from the first block's
    /// output, as Apple's encoder may do.
    #[test]
    fn a_match_may_reach_into_the_previous_block() {
        let mut s = Vec::new();
        s.extend_from_slice(b"bv4-");
        s.extend_from_slice(&8u32.to_le_bytes());
        s.extend_from_slice(b"ABCDEFGH");
        // LZ4 block: token 0x0f... simplest: no literals, match offset 8,
        // length 4+8=12, then the mandatory last-literals (5 bytes).
        let block = [0x08u8, 0x08, 0x00, 0x50, b'v', b'w', b'x', b'y', b'z'];
        s.extend_from_slice(b"bv41");
        s.extend_from_slice(&17u32.to_le_bytes());
        s.extend_from_slice(&(block.len() as u32).to_le_bytes());
        s.extend_from_slice(&block);
        s.extend_from_slice(b"bv4$");
        assert_eq!(
            decode_all(&s, 100).unwrap(),
            b"ABCDEFGHABCDEFGHABCDvwxyz"[..25]
        );
    }

    #[test]
    fn an_empty_stream_is_just_the_end_marker() {
        assert_eq!(decode_all(b"bv4$", 0).unwrap(), b"");
    }

    #[test]
    fn malformed_streams_are_refused() {
        let good = encode(&sample(100_000));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"bv42\0\0\0\0".to_vec(), "unknown block magic"),
            (good[..good.len() - 4].to_vec(), "ends inside a block"),
            (good[..good.len() / 2].to_vec(), "ends inside a block"),
            ([&good[..], b"x"].concat(), "data follows"),
            (
                [&b"bv4-"[..], &u32::MAX.to_le_bytes()].concat(),
                "more than the",
            ),
            (
                [&b"bv41"[..], &16u32.to_le_bytes(), &1000u32.to_le_bytes()].concat(),
                "more than LZ4 can need",
            ),
            (
                // An LZ4 block matching 8 bytes back with nothing before it.
                [
                    &b"bv41"[..],
                    &17u32.to_le_bytes(),
                    &9u32.to_le_bytes(),
                    &[0x08u8, 0x08, 0x00, 0x50, 1, 2, 3, 4, 5],
                    b"bv4$",
                ]
                .concat(),
                "corrupt",
            ),
            (
                // Declares 20 decoded bytes, holds 5 literals.
                [
                    &b"bv41"[..],
                    &20u32.to_le_bytes(),
                    &6u32.to_le_bytes(),
                    &[0x50u8, 1, 2, 3, 4, 5],
                    b"bv4$",
                ]
                .concat(),
                "decodes to 5 bytes",
            ),
        ];
        for (stream, want) in cases {
            let err = decode_all(&stream, 1 << 20).unwrap_err().to_string();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
    }

    #[test]
    fn output_beyond_the_declared_length_is_refused() {
        let data = sample(200_000);
        let stream = encode(&data);
        let mut seen = 0u64;
        let err = decode(&stream[..], 100_000, |b| {
            seen += b.len() as u64;
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(err, Lz4Error::TooLong(100_000)), "{err}");
        assert!(seen <= 100_000);
    }
}
