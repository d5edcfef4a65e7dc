//! The length-prefixed framing of QEMU's `-netdev stream` protocol, which
//! passt speaks in its default (qemu) mode: every Ethernet frame on the
//! unix stream socket is preceded by its length as a 4-byte big-endian
//! integer (passt's `tap_hdr.vnet_len`, written with `htonl`).

use std::io::{self, Read};

use super::{MAX_FRAME_LEN, MIN_FRAME_LEN};

/// Length of the prefix.
pub const PREFIX_LEN: usize = 4;

/// Appends the prefixed `frame` to `out` (cleared first), so it can go to
/// the socket in one write.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let len = u32::try_from(frame.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too long"))?;
    out.clear();
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    Ok(())
}

/// Reassembles frames from a byte stream read in arbitrary pieces.
///
/// Memory is bounded by one maximal frame: a prefix announcing a frame
/// longer than [`MAX_FRAME_LEN`] (or shorter than [`MIN_FRAME_LEN`]) is
/// logged and its bytes are skipped as they arrive, which keeps the stream
/// in step without buffering them.
pub struct FrameDecoder {
    buf: Vec<u8>,
    filled: usize,
    /// Bytes of a refused frame still to be discarded.
    skip: u64,
    dropped: u64,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self {
            buf: vec![0; PREFIX_LEN + MAX_FRAME_LEN],
            filled: 0,
            skip: 0,
            dropped: 0,
        }
    }

    /// Frames refused for their length so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// One `read` from `src` (which must not block if the caller cannot
    /// wait); returns the byte count, 0 meaning end of stream.
    pub fn fill_from(&mut self, src: &mut impl Read) -> io::Result<usize> {
        if self.skip > 0 {
            let n = usize::try_from(self.skip)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let got = src.read(&mut self.buf[..n])?;
            self.skip -= got as u64;
            return Ok(got);
        }
        let got = src.read(&mut self.buf[self.filled..])?;
        self.filled += got;
        Ok(got)
    }

    /// The next complete frame, copied into `out` (which must hold
    /// [`MAX_FRAME_LEN`] bytes); returns its length.
    pub fn next_frame(&mut self, out: &mut [u8]) -> Option<usize> {
        loop {
            if self.skip > 0 || self.filled < PREFIX_LEN {
                return None;
            }
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let len = len as usize;
            let have = self.filled - PREFIX_LEN;
            if !(MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&len) {
                self.dropped += 1;
                vm_core::log_limited!(
                    warn,
                    "net: dropping a {len}-byte frame from the stream backend"
                );
                if have >= len {
                    self.consume(PREFIX_LEN + len);
                } else {
                    self.skip = (len - have) as u64;
                    self.filled = 0;
                }
                continue;
            }
            if have < len {
                return None;
            }
            out[..len].copy_from_slice(&self.buf[PREFIX_LEN..PREFIX_LEN + len]);
            self.consume(PREFIX_LEN + len);
            return Some(len);
        }
    }

    fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out its data a few bytes per `read`.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.step.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    fn decode_all(stream: &[u8], step: usize) -> (Vec<Vec<u8>>, u64) {
        let mut dec = FrameDecoder::new();
        let mut src = Trickle { data: stream, step };
        let mut out = vec![0u8; MAX_FRAME_LEN];
        let mut frames = Vec::new();
        loop {
            while let Some(n) = dec.next_frame(&mut out) {
                frames.push(out[..n].to_vec());
            }
            if dec.fill_from(&mut src).unwrap() == 0 {
                break;
            }
        }
        (frames, dec.dropped())
    }

    #[test]
    fn encode_is_big_endian_length_then_frame() {
        let mut out = vec![9; 3];
        encode(&[1, 2, 3, 4, 5], &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 5, 1, 2, 3, 4, 5]);
        encode(&frame(0x1234, 0), &mut out).unwrap();
        assert_eq!(out[..4], [0, 0, 0x12, 0x34]);
    }

    #[test]
    fn round_trip_in_any_read_size() {
        let frames = vec![
            frame(60, 1),
            frame(1514, 2),
            frame(MAX_FRAME_LEN, 3),
            frame(14, 4),
        ];
        let mut stream = Vec::new();
        let mut one = Vec::new();
        for f in &frames {
            encode(f, &mut one).unwrap();
            stream.extend_from_slice(&one);
        }
        for step in [1, 3, 4, 5, 1000, 70000] {
            let (got, dropped) = decode_all(&stream, step);
            assert_eq!(got, frames, "read size {step}");
            assert_eq!(dropped, 0);
        }
    }

    #[test]
    fn bad_lengths_are_skipped_and_stream_stays_in_step() {
        let mut stream = Vec::new();
        let mut one = Vec::new();
        encode(&frame(13, 0), &mut one).unwrap(); // runt
        stream.extend_from_slice(&one);
        encode(&frame(60, 7), &mut one).unwrap();
        stream.extend_from_slice(&one);
        encode(&frame(MAX_FRAME_LEN + 1, 0), &mut one).unwrap(); // giant
        stream.extend_from_slice(&one);
        encode(&frame(100, 9), &mut one).unwrap();
        stream.extend_from_slice(&one);
        for step in [1, 7, 65536, 200_000] {
            let (got, dropped) = decode_all(&stream, step);
            assert_eq!(got, vec![frame(60, 7), frame(100, 9)], "read size {step}");
            assert_eq!(dropped, 2);
        }
    }

    #[test]
    fn partial_frame_waits_for_the_rest() {
        let mut one = Vec::new();
        encode(&frame(64, 5), &mut one).unwrap();
        let mut dec = FrameDecoder::new();
        let mut out = vec![0u8; MAX_FRAME_LEN];
        dec.fill_from(&mut &one[..2]).unwrap();
        assert_eq!(dec.next_frame(&mut out), None);
        dec.fill_from(&mut &one[2..40]).unwrap();
        assert_eq!(dec.next_frame(&mut out), None);
        dec.fill_from(&mut &one[40..]).unwrap();
        assert_eq!(dec.next_frame(&mut out), Some(64));
        assert_eq!(out[..64], frame(64, 5));
        assert_eq!(dec.next_frame(&mut out), None);
    }
}
