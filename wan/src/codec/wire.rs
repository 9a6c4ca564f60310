//! Bounds-checked little-endian reading and ULEB128 / zigzag helpers.
//!
//! Every read from network bytes goes through [`Reader`], so a short or
//! lying input turns into a [`CodecError`] instead of a panic.

use super::error::CodecError;

/// A cursor over untrusted bytes.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// `what` names the section in truncation errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Reader { buf, pos: 0, what }
    }

    /// Offset of the next byte to read.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(CodecError::Truncated {
                what: self.what,
                needed: n as u64,
                available: self.remaining() as u64,
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// ULEB128, at most 10 bytes, rejecting bits beyond 64.
    pub fn uleb(&mut self) -> Result<u64, CodecError> {
        let mut value = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let low = u64::from(b & 0x7f);
            if i == 9 && low > 1 {
                return Err(CodecError::corrupt("ULEB128 value exceeds 64 bits"));
            }
            value |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(CodecError::corrupt("ULEB128 longer than 10 bytes"))
    }

    pub fn zigzag(&mut self) -> Result<i64, CodecError> {
        Ok(unzigzag(self.uleb()?))
    }
}

pub fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

pub fn uleb_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uleb_round_trip_and_length() {
        for v in [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX] {
            let mut out = Vec::new();
            put_uleb(&mut out, v);
            assert_eq!(out.len(), uleb_len(v));
            assert_eq!(Reader::new(&out, "t").uleb(), Ok(v));
        }
    }

    #[test]
    fn uleb_rejects_overlong_and_overflow() {
        let eleven = [0x80u8; 11];
        assert!(matches!(
            Reader::new(&eleven, "t").uleb(),
            Err(CodecError::Corrupt(_))
        ));
        let mut over = vec![0xffu8; 9];
        over.push(0x02);
        assert!(matches!(
            Reader::new(&over, "t").uleb(),
            Err(CodecError::Corrupt(_))
        ));
        assert!(matches!(
            Reader::new(&[0x80], "t").uleb(),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn zigzag_round_trip() {
        for v in [0i64, -1, 1, i64::MIN, i64::MAX, -1000] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }
}
