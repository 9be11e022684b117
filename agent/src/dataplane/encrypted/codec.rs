//! The encrypted data plane's wire format (sans-IO, caller-owned buffers,
//! no allocation per packet).
//!
//! One UDP datagram to the peer's encrypted port (DESIGN.md "Encrypted data
//! plane"):
//!
//! ```text
//! SPI (4) | sequence (8) | AES-256-GCM( VXLAN header (8) | Ethernet frame ) | tag (16)
//! ```
//!
//! nonce = salt (4, from the key derivation) ‖ sequence (8); AAD = SPI ‖
//! sequence. The VXLAN header is RFC 7348 §5's: flags with the I bit, the
//! 24-bit VNI; it rides inside the seal, so the VNI is authenticated too.
//! On an IPv4 underlay a container frame of MTU m becomes
//! 20 + 8 + [`OVERHEAD`] + 14 + m bytes on the wire: hence MTU = underlay − 78.

use std::ops::Range;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag};

use super::replay::{Replay, ReplayWindow};
use crate::keys::pair::{DirectionKey, PACKETS_PER_KEY};

pub const SPI_LEN: usize = 4;
pub const SEQ_LEN: usize = 8;
pub const HEADER_LEN: usize = SPI_LEN + SEQ_LEN;
pub const VXLAN_LEN: usize = 8;
pub const TAG_LEN: usize = 16;
/// Bytes the codec adds around a frame.
pub const OVERHEAD: usize = HEADER_LEN + VXLAN_LEN + TAG_LEN;
/// Where the frame starts in a buffer sealed in place.
pub const FRAME_AT: usize = HEADER_LEN + VXLAN_LEN;
/// IPv4 (20) + UDP (8) + codec overhead + inner Ethernet (14): what an
/// encrypted network's MTU is below the underlay's.
pub const MTU_OVERHEAD_IPV4: u32 = 20 + 8 + OVERHEAD as u32 + 14;

/// RFC 7348 §5: the I flag (a valid VNI follows).
const VXLAN_FLAG_I: u8 = 0x08;
const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("buffer too small for the frame and its tag")]
    BufferTooSmall,
    #[error("VNI {0} does not fit 24 bits")]
    BadVni(u32),
    #[error("send key exhausted (2^64 packets)")]
    Exhausted,
}

/// Why a received datagram was dropped. Each reason has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    #[error("too short to be an encrypted frame")]
    Short,
    #[error("{0}")]
    Replay(Replay),
    #[error("sequence number from a key generation not in use")]
    Generation,
    #[error("authentication failed (bad tag: tampered, or not this key)")]
    BadTag,
    #[error("inner VXLAN header invalid")]
    BadVxlan,
}

/// The SPI of a datagram, to find its receive key.
pub fn spi_of(datagram: &[u8]) -> Option<u32> {
    let b: [u8; 4] = datagram.get(..SPI_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

fn generation_of(seq: u64) -> u32 {
    (seq / PACKETS_PER_KEY) as u32
}

/// The sending half of a pair direction: keys and the sequence counter.
pub struct Sender {
    key: DirectionKey,
    generation: u32,
    aead: LessSafeKey,
    next_seq: u64,
}

impl Sender {
    pub fn new(key: DirectionKey) -> Self {
        Self {
            aead: key.generation(0),
            generation: 0,
            key,
            next_seq: 0,
        }
    }

    pub fn spi(&self) -> u32 {
        self.key.spi
    }

    /// Packets sealed so far.
    pub fn sent(&self) -> u64 {
        self.next_seq
    }

    /// Seals the Ethernet frame at `buf[FRAME_AT..FRAME_AT + frame_len]`
    /// in place for network `vni`; the datagram is `buf[..returned]`.
    /// `buf` needs [`TAG_LEN`] spare bytes after the frame.
    pub fn seal(&mut self, vni: u32, buf: &mut [u8], frame_len: usize) -> Result<usize, SealError> {
        if vni > MAX_VNI {
            return Err(SealError::BadVni(vni));
        }
        let end = FRAME_AT + frame_len;
        if buf.len() < end + TAG_LEN {
            return Err(SealError::BufferTooSmall);
        }
        let seq = self.next_seq;
        self.next_seq = seq.checked_add(1).ok_or(SealError::Exhausted)?;
        let g = generation_of(seq);
        if g != self.generation {
            self.aead = self.key.generation(g);
            self.generation = g;
        }
        buf[..SPI_LEN].copy_from_slice(&self.key.spi.to_be_bytes());
        buf[SPI_LEN..HEADER_LEN].copy_from_slice(&seq.to_be_bytes());
        let vx = &mut buf[HEADER_LEN..FRAME_AT];
        vx.copy_from_slice(&[VXLAN_FLAG_I, 0, 0, 0, 0, 0, 0, 0]);
        vx[4..7].copy_from_slice(&vni.to_be_bytes()[1..]);
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(self.key.nonce(seq)),
                Aad::from(&head[..]),
                &mut body[..VXLAN_LEN + frame_len],
            )
            // ring fails only past 2^36 bytes of plaintext per call.
            .map_err(|_| SealError::BufferTooSmall)?;
        buf[end..end + TAG_LEN].copy_from_slice(tag.as_ref());
        Ok(end + TAG_LEN)
    }
}

/// A datagram that opened: its network and where its frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub vni: u32,
    pub seq: u64,
    pub frame: Range<usize>,
}

/// The receiving half of a pair direction: keys and the replay window.
pub struct Receiver {
    key: DirectionKey,
    /// The newest generation's key.
    generation: u32,
    aead: LessSafeKey,
    /// A neighbouring generation's key (the next one, or after a rollover
    /// the previous one for reordered packets), derived once: a forged
    /// packet naming it must not cost a key derivation each.
    other: Option<(u32, LessSafeKey)>,
    window: ReplayWindow,
}

impl Receiver {
    pub fn new(key: DirectionKey) -> Self {
        Self {
            aead: key.generation(0),
            generation: 0,
            other: None,
            key,
            window: ReplayWindow::new(),
        }
    }

    pub fn spi(&self) -> u32 {
        self.key.spi
    }

    /// Opens `datagram` in place (its SPI already matched this key). The
    /// replay window moves only for packets whose tag verified.
    pub fn open(&mut self, datagram: &mut [u8]) -> Result<Opened, DropReason> {
        if datagram.len() < OVERHEAD {
            return Err(DropReason::Short);
        }
        let mut seq = [0u8; SEQ_LEN];
        seq.copy_from_slice(&datagram[SPI_LEN..HEADER_LEN]);
        let seq = u64::from_be_bytes(seq);
        self.window.check(seq).map_err(DropReason::Replay)?;
        let g = generation_of(seq);
        let aead = if g == self.generation {
            &self.aead
        } else if Some(g) == self.generation.checked_add(1)
            || g.checked_add(1) == Some(self.generation)
        {
            if self.other.as_ref().is_none_or(|(og, _)| *og != g) {
                self.other = Some((g, self.key.generation(g)));
            }
            match &self.other {
                Some((_, k)) => k,
                None => return Err(DropReason::Generation),
            }
        } else {
            return Err(DropReason::Generation);
        };
        let tag_at = datagram.len() - TAG_LEN;
        let (head, rest) = datagram.split_at_mut(HEADER_LEN);
        let (body, tag) = rest.split_at_mut(tag_at - HEADER_LEN);
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| DropReason::Short)?;
        aead.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(self.key.nonce(seq)),
            Aad::from(&head[..]),
            Tag::from(tag),
            body,
            0..,
        )
        .map_err(|_| DropReason::BadTag)?;
        if g > self.generation
            && let Some((og, k)) = self.other.take()
        {
            // The sender moved on: the old key stays as the neighbour for
            // packets reordered across the boundary.
            let old = std::mem::replace(&mut self.aead, k);
            self.other = Some((self.generation, old));
            self.generation = og;
        }
        // Authentic: record it (cannot fail: checked above, nothing between).
        self.window.record(seq).map_err(DropReason::Replay)?;
        let vx = &body[..VXLAN_LEN];
        if vx[0] & VXLAN_FLAG_I == 0 {
            return Err(DropReason::BadVxlan);
        }
        let vni = u32::from_be_bytes([0, vx[4], vx[5], vx[6]]);
        Ok(Opened {
            vni,
            seq,
            frame: FRAME_AT..tag_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ClusterId, NodeId};
    use crate::keys::pair::{EpochSecret, PairKeys};

    fn pair() -> (PairKeys, PairKeys) {
        let c = ClusterId::from_bytes([1; 16]);
        let (a, b) = (NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16]));
        let sa = EpochSecret::from_random(3, [5; 32]);
        let sb = EpochSecret::from_random(3, [6; 32]);
        (
            sa.pair(c, a, b, sb.public()).unwrap(),
            sb.pair(c, b, a, sa.public()).unwrap(),
        )
    }

    fn sealed(tx: &mut Sender, vni: u32, frame: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; FRAME_AT + frame.len() + TAG_LEN];
        buf[FRAME_AT..FRAME_AT + frame.len()].copy_from_slice(frame);
        let n = tx.seal(vni, &mut buf, frame.len()).unwrap();
        buf.truncate(n);
        buf
    }

    #[test]
    fn round_trip_and_overhead() {
        let (a, b) = pair();
        let (mut tx, mut rx) = (Sender::new(a.send), Receiver::new(b.recv));
        assert_eq!(MTU_OVERHEAD_IPV4, 78, "DESIGN.md: underlay MTU - 78");
        let frame = b"\xff\xff\xff\xff\xff\xff\x02\x00\x00\x00\x00\x01\x08\x06arp!";
        let mut d = sealed(&mut tx, 0x00ab_cdef, frame);
        assert_eq!(d.len(), frame.len() + OVERHEAD);
        assert_eq!(spi_of(&d), Some(rx.spi()));
        let o = rx.open(&mut d).unwrap();
        assert_eq!(o.vni, 0x00ab_cdef);
        assert_eq!(o.seq, 0);
        assert_eq!(&d[o.frame], frame);
        // The frame does not appear on the wire.
        let d2 = sealed(&mut tx, 7, frame);
        assert!(!d2.windows(4).any(|w| w == b"arp!"));
    }

    #[test]
    fn replays_tampering_and_the_wrong_key_are_dropped() {
        let (a, b) = pair();
        let (mut tx, mut rx) = (Sender::new(a.send), Receiver::new(b.recv));
        let d = sealed(&mut tx, 9, b"payload-bytes");
        assert!(rx.open(&mut d.clone()).is_ok());
        assert_eq!(
            rx.open(&mut d.clone()),
            Err(DropReason::Replay(Replay::Seen))
        );
        let d = sealed(&mut tx, 9, b"payload-bytes");
        // SPI, the sequence number's low byte (its high bytes name a key
        // generation, refused before opening), VXLAN header, frame, tag.
        for i in [0, HEADER_LEN - 1, HEADER_LEN, FRAME_AT + 2, d.len() - 1] {
            let mut t = d.clone();
            t[i] ^= 0x40;
            assert_eq!(rx.open(&mut t), Err(DropReason::BadTag), "byte {i}");
        }
        // Tampered copies did not burn the sequence number.
        assert!(rx.open(&mut d.clone()).is_ok());
        // The reverse direction's key does not open it.
        let mut wrong = Receiver::new(a.recv);
        assert_eq!(
            wrong.open(&mut sealed(&mut tx, 9, b"x")),
            Err(DropReason::BadTag)
        );
        assert_eq!(rx.open(&mut [0; OVERHEAD - 1]), Err(DropReason::Short));
    }

    #[test]
    fn generations_roll_over_without_coordination() {
        let (a, b) = pair();
        let (mut tx, mut rx) = (Sender::new(a.send), Receiver::new(b.recv));
        tx.next_seq = PACKETS_PER_KEY - 1;
        let mut last_of_0 = sealed(&mut tx, 1, b"a");
        let mut first_of_1 = sealed(&mut tx, 1, b"b");
        assert_eq!(rx.open(&mut first_of_1).map(|o| o.seq), Ok(PACKETS_PER_KEY));
        // Reordered across the boundary: still opens.
        assert_eq!(
            rx.open(&mut last_of_0).map(|o| o.seq),
            Ok(PACKETS_PER_KEY - 1)
        );
        // A sequence number from a far generation is refused unopened.
        tx.next_seq = 5 * PACKETS_PER_KEY;
        assert_eq!(
            rx.open(&mut sealed(&mut tx, 1, b"c")),
            Err(DropReason::Generation)
        );
    }

    #[test]
    fn bad_input_is_refused_not_panicked_on() {
        let (a, b) = pair();
        let (mut tx, mut rx) = (Sender::new(a.send), Receiver::new(b.recv));
        assert_eq!(
            tx.seal(1 << 24, &mut [0u8; 64], 4),
            Err(SealError::BadVni(1 << 24))
        );
        assert_eq!(
            tx.seal(1, &mut [0u8; FRAME_AT + 4], 4),
            Err(SealError::BufferTooSmall)
        );
        let mut state = 1u64;
        for len in 0..300 {
            let mut junk: Vec<u8> = (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                    (state >> 56) as u8
                })
                .collect();
            assert!(rx.open(&mut junk).is_err());
        }
    }
}
