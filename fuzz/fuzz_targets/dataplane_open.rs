//! The encrypted data plane's receive path: anything on 4500/udp. Junk
//! must be dropped with a reason; a sealed frame must open to itself, and
//! any single flipped bit must make it fail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::dataplane::encrypted::codec::{FRAME_AT, Receiver, Sender, TAG_LEN, spi_of};
use ovl_agent::ids::{ClusterId, NodeId};
use ovl_agent::keys::pair::EpochSecret;

fuzz_target!(|data: &[u8]| {
    let c = ClusterId::from_bytes([1; 16]);
    let (a, b) = (NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16]));
    let sa = EpochSecret::from_random(3, [5; 32]);
    let sb = EpochSecret::from_random(3, [6; 32]);
    let (Some(ka), Some(kb)) = (
        sa.pair(c, a, b, sb.public()).ok(),
        sb.pair(c, b, a, sa.public()).ok(),
    ) else {
        return;
    };
    let (mut tx, mut rx) = (Sender::new(ka.send), Receiver::new(kb.recv));

    // Junk as received.
    let _ = spi_of(data);
    let _ = rx.open(&mut data.to_vec());

    // Round trip of the input as a frame.
    let Some((&flip, frame)) = data.split_first() else {
        return;
    };
    let mut buf = vec![0u8; FRAME_AT + frame.len() + TAG_LEN];
    buf[FRAME_AT..FRAME_AT + frame.len()].copy_from_slice(frame);
    let Ok(n) = tx.seal(42, &mut buf, frame.len()) else {
        return;
    };
    buf.truncate(n);
    let sealed = buf.clone();
    let opened = rx.open(&mut buf).expect("own seal opens");
    assert_eq!(opened.vni, 42);
    assert_eq!(&buf[opened.frame], frame);
    // A flipped bit anywhere is refused (tag, or replay for the same seq).
    let mut t = sealed;
    let at = usize::from(flip) % t.len();
    t[at] ^= 1 << (flip % 8);
    assert!(rx.open(&mut t).is_err());
});
