//! The dedup's winners, packed: each click varint-encoded into a log-structured arena.
//!
//! A winner is most of the dedup's state, and as a [`Click`] it is 128 bytes whatever it
//! holds: a `u128`, two 24-byte strings, a 17-byte IP and four `u64`s, padded. The
//! information is far less: the standard workload's impression ids take 40 bits, its
//! click and user ids are decimal numbers, its event and record times lie within a few
//! seconds of each other. Packed with postcard (varints, numbers for decimal ids, record
//! time relative to its chunk's first) a winner takes about 30 bytes and keeps every field
//! exactly, so a retraction is the very click that was added.
//!
//! Records are appended to fixed-size chunks and never move while their chunk holds many
//! live ones. Winners leave in about the order they came (they expire a horizon after
//! their record time), so old chunks empty as a whole and are freed; a chunk left at most
//! half full by the winners a better copy replaced is compacted: its live records are
//! appended anew and the caller is told where each one went.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use smol_str::SmolStr;

use super::classify::Click;

/// Where a packed click is: its chunk and its byte offset there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClickRef(u64);

impl ClickRef {
    fn new(chunk: u32, offset: u32) -> ClickRef {
        ClickRef(u64::from(chunk) << 32 | u64::from(offset))
    }

    fn chunk(self) -> usize {
        (self.0 >> 32) as usize
    }

    fn offset(self) -> usize {
        (self.0 & u64::from(u32::MAX)) as usize
    }
}

/// Bytes per chunk. A record larger than this gets a chunk of its own size.
const CHUNK_BYTES: usize = 1 << 20;

/// Each record starts with its count of identical live copies (0: removed), little-endian,
/// the one field that changes in place.
const COPIES: usize = 4;

/// A click id or user id: a canonical decimal number as a varint, anything else as text.
#[derive(Serialize, Deserialize)]
enum Id<'a> {
    Number(u64),
    Text(&'a str),
}

impl<'a> Id<'a> {
    fn of(s: &'a str) -> Id<'a> {
        match crate::views::decimal_id(s) {
            Some(n) => Id::Number(n),
            None => Id::Text(s),
        }
    }

    fn to_smol(&self) -> SmolStr {
        match self {
            Id::Text(s) => SmolStr::new(s),
            Id::Number(n) => {
                // At most 20 digits: SmolStr keeps them inline, no allocation.
                let mut digits = [0u8; 20];
                let mut at = digits.len();
                let mut n = *n;
                loop {
                    at -= 1;
                    digits[at] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                SmolStr::new(std::str::from_utf8(&digits[at..]).unwrap_or_default())
            }
        }
    }
}

/// A click as stored. The impression comes first, so a lookup decodes only it.
#[derive(Serialize, Deserialize)]
struct Packed<'a> {
    impression_id: u128,
    /// Record time minus the chunk's base, which records moved by compaction precede.
    record_since_base: i64,
    /// Record time minus event time, wrapping (event times are clamped to at most the
    /// record time, so this is small).
    event_before_record: u64,
    ad_id: u64,
    #[serde(borrow)]
    click_id: Id<'a>,
    #[serde(borrow)]
    user_id: Id<'a>,
    ip: IpAddr,
    cpc_micros: u64,
}

impl<'a> Packed<'a> {
    fn of(click: &'a Click, base_ms: u64) -> Packed<'a> {
        Packed {
            impression_id: click.impression_id,
            record_since_base: click.record_time_ms.wrapping_sub(base_ms) as i64,
            event_before_record: click.record_time_ms.wrapping_sub(click.event_time_ms),
            ad_id: click.ad_id,
            click_id: Id::of(&click.click_id),
            user_id: Id::of(&click.user_id),
            ip: click.ip,
            cpc_micros: click.cpc_micros,
        }
    }

    fn click(&self, base_ms: u64) -> Click {
        let record_time_ms = base_ms.wrapping_add(self.record_since_base as u64);
        Click {
            impression_id: self.impression_id,
            ad_id: self.ad_id,
            event_time_ms: record_time_ms.wrapping_sub(self.event_before_record),
            record_time_ms,
            click_id: self.click_id.to_smol(),
            user_id: self.user_id.to_smol(),
            ip: self.ip,
            cpc_micros: self.cpc_micros,
        }
    }
}

/// One chunk of records, and the bytes of it still live.
#[derive(Debug)]
struct Chunk {
    bytes: Vec<u8>,
    limit: usize,
    live: usize,
    base_ms: u64,
}

impl Chunk {
    /// The record at `offset`: its copies, its decoded form and its length in bytes.
    fn record(&self, offset: usize) -> (u32, Packed<'_>, usize) {
        let body = &self.bytes[offset + COPIES..];
        match postcard::take_from_bytes::<Packed>(body) {
            Ok((packed, rest)) => (
                self.copies(offset),
                packed,
                COPIES + body.len() - rest.len(),
            ),
            // Only this module writes the bytes, from a `Packed`.
            Err(e) => unreachable!("a packed click does not decode: {e}"),
        }
    }

    /// The copies of the record at `offset`, read from its header alone.
    fn copies(&self, offset: usize) -> u32 {
        let mut copies = [0u8; COPIES];
        copies.copy_from_slice(&self.bytes[offset..offset + COPIES]);
        u32::from_le_bytes(copies)
    }

    fn set_copies(&mut self, offset: usize, copies: u32) {
        self.bytes[offset..offset + COPIES].copy_from_slice(&copies.to_le_bytes());
    }
}

/// Clicks packed into chunks, each with a count of identical live copies.
#[derive(Debug, Default)]
pub struct PackedClicks {
    chunks: Vec<Option<Chunk>>,
    /// Ids of freed chunks, to reuse.
    spare: Vec<u32>,
    head: Option<u32>,
    len: usize,
    freed: usize,
}

impl PackedClicks {
    /// How many clicks are stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no click is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `click` with `copies` identical live copies.
    pub fn push(&mut self, click: &Click, copies: u32) -> ClickRef {
        self.len += 1;
        self.append(click, copies)
    }

    /// How many chunks were freed so far.
    pub fn chunks_freed(&self) -> usize {
        self.freed
    }

    fn chunk(&self, at: ClickRef) -> &Chunk {
        match self.chunks.get(at.chunk()).and_then(Option::as_ref) {
            Some(chunk) => chunk,
            None => unreachable!("a click ref points into a freed chunk"),
        }
    }

    fn chunk_mut(&mut self, at: ClickRef) -> &mut Chunk {
        match self.chunks.get_mut(at.chunk()).and_then(Option::as_mut) {
            Some(chunk) => chunk,
            None => unreachable!("a click ref points into a freed chunk"),
        }
    }

    /// The impression of the click at `at`, decoding nothing else.
    pub fn impression(&self, at: ClickRef) -> u128 {
        let chunk = self.chunk(at);
        match postcard::take_from_bytes::<u128>(&chunk.bytes[at.offset() + COPIES..]) {
            Ok((imp, _)) => imp,
            Err(e) => unreachable!("a packed click does not decode: {e}"),
        }
    }

    /// The click at `at`.
    pub fn get(&self, at: ClickRef) -> Click {
        let chunk = self.chunk(at);
        chunk.record(at.offset()).1.click(chunk.base_ms)
    }

    /// The identical live copies of the click at `at`.
    pub fn copies(&self, at: ClickRef) -> u32 {
        self.chunk(at).copies(at.offset())
    }

    /// Sets the identical live copies of the click at `at` (at least one).
    pub fn set_copies(&mut self, at: ClickRef, copies: u32) {
        self.chunk_mut(at).set_copies(at.offset(), copies.max(1));
    }

    /// Whether the click at `at` is exactly `click`: their packed bytes are equal (the
    /// encoding is canonical), with nothing decoded.
    pub fn holds(&self, at: ClickRef, click: &Click) -> bool {
        let chunk = self.chunk(at);
        let mut stack = Body::default();
        let body = stack.pack(click, chunk.base_ms);
        let start = at.offset() + COPIES;
        chunk.bytes.get(start..start + body.len()) == Some(body)
    }

    /// Removes the click at `at`. If that leaves its chunk at most half live, the chunk's
    /// other clicks move: `moved(impression, from, to)` for each.
    pub fn remove(&mut self, at: ClickRef, mut moved: impl FnMut(u128, ClickRef, ClickRef)) {
        let offset = at.offset();
        let chunk = self.chunk_mut(at);
        let (_, _, length) = chunk.record(offset);
        chunk.set_copies(offset, 0);
        chunk.live -= length;
        let sparse = chunk.live * 2 <= chunk.bytes.len();
        self.len -= 1;
        let id = at.chunk() as u32;
        if sparse && self.head != Some(id) {
            self.compact(id, &mut moved);
        }
    }

    /// Moves the live records of chunk `id` to the head and frees it.
    fn compact(&mut self, id: u32, moved: &mut impl FnMut(u128, ClickRef, ClickRef)) {
        let Some(chunk) = self.chunks[id as usize].take() else {
            return;
        };
        let mut offset = 0;
        while chunk.live > 0 && offset < chunk.bytes.len() {
            let (copies, packed, length) = chunk.record(offset);
            if copies > 0 {
                let click = packed.click(chunk.base_ms);
                let to = self.append(&click, copies);
                moved(click.impression_id, ClickRef::new(id, offset as u32), to);
            }
            offset += length;
        }
        // Only now may a new chunk take the id: a reference into it must not look like one
        // into the chunk being emptied.
        self.spare.push(id);
        self.freed += 1;
    }

    /// Appends a record to the head chunk, starting a new one when it is full.
    fn append(&mut self, click: &Click, copies: u32) -> ClickRef {
        let mut stack = Body::default();
        if let Some(head) = self.head
            && let Some(Some(chunk)) = self.chunks.get_mut(head as usize)
        {
            let body = stack.pack(click, chunk.base_ms);
            if chunk.bytes.len() + COPIES + body.len() <= chunk.limit {
                return Self::write(head, chunk, copies, body);
            }
        }
        let base_ms = click.record_time_ms;
        let body = stack.pack(click, base_ms);
        let limit = CHUNK_BYTES.max(COPIES + body.len());
        let chunk = Chunk {
            bytes: Vec::with_capacity(limit),
            limit,
            live: 0,
            base_ms,
        };
        let id = match self.spare.pop() {
            Some(id) => {
                self.chunks[id as usize] = Some(chunk);
                id
            }
            None => {
                self.chunks.push(Some(chunk));
                (self.chunks.len() - 1) as u32
            }
        };
        self.head = Some(id);
        match self.chunks[id as usize].as_mut() {
            Some(chunk) => Self::write(id, chunk, copies, body),
            None => unreachable!("the chunk was just stored"),
        }
    }

    fn write(id: u32, chunk: &mut Chunk, copies: u32, body: &[u8]) -> ClickRef {
        let offset = chunk.bytes.len();
        chunk.bytes.resize(offset + COPIES, 0);
        chunk.set_copies(offset, copies.max(1));
        chunk.bytes.extend_from_slice(body);
        let at = ClickRef::new(id, offset as u32);
        chunk.live += COPIES + body.len();
        at
    }
}

/// Room to pack a click: on the stack when it fits, as almost every click does.
struct Body {
    stack: [u8; 160],
    heap: Vec<u8>,
}

impl Default for Body {
    fn default() -> Body {
        Body {
            stack: [0; 160],
            heap: Vec::new(),
        }
    }
}

impl Body {
    /// The packed form of `click`, its record time relative to `base_ms`.
    fn pack(&mut self, click: &Click, base_ms: u64) -> &[u8] {
        let packed = Packed::of(click, base_ms);
        // Integers, byte arrays and strings: the only way postcard fails on them is a full
        // buffer, and the heap has none.
        if let Ok(body) = postcard::to_slice(&packed, &mut self.stack) {
            return body;
        }
        match postcard::to_extend(&packed, std::mem::take(&mut self.heap)) {
            Ok(heap) => self.heap = heap,
            Err(e) => unreachable!("a click does not pack: {e}"),
        }
        &self.heap
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn click(imp: u128, record: u64, click_id: &str, user_id: &str, ip: IpAddr) -> Click {
        Click {
            impression_id: imp,
            ad_id: imp as u64 % 10_007,
            event_time_ms: record.saturating_sub(imp as u64 % 5_001),
            record_time_ms: record,
            click_id: SmolStr::new(click_id),
            user_id: SmolStr::new(user_id),
            ip,
            cpc_micros: 100_000 + imp as u64,
        }
    }

    #[test]
    fn every_field_round_trips_exactly() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let v6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
        let long = "x".repeat(300);
        let clicks = [
            click(1, 1_700_000_000_000, "0", "1", v4),
            click(u128::MAX, u64::MAX, "007", "-1", v6),
            click(2, 0, "18446744073709551615", "18446744073709551616", v4),
            click(3, 5, "", "+5", v6),
            click(4, 1_700_000_000_000, &long, "ü", v4),
            Click {
                event_time_ms: u64::MAX,
                record_time_ms: 0,
                ..click(5, 0, "a", "b", v4)
            },
        ];
        let mut packed = PackedClicks::default();
        let refs: Vec<_> = clicks.iter().map(|c| packed.push(c, 1)).collect();
        for (c, at) in clicks.iter().zip(&refs) {
            assert_eq!(&packed.get(*at), c);
            assert_eq!(packed.impression(*at), c.impression_id);
        }
        assert_eq!(packed.len(), clicks.len());
    }

    #[test]
    fn a_decimal_id_packs_as_a_number() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let record = |c: &Click| Body::default().pack(c, c.record_time_ms).len();
        let numeric = record(&click(1, 1_000, "1234567", "654321", v4));
        let text = record(&click(1, 1_000, "a234567", "b54321", v4));
        assert!(numeric + 6 <= text, "{numeric} vs {text}");
    }

    #[test]
    fn only_the_same_click_is_held() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut packed = PackedClicks::default();
        let c = click(9, 1_000, "12", "34", v4);
        let at = packed.push(&c, 1);
        let next = packed.push(&click(10, 1_000, "5", "6", v4), 1);
        assert!(packed.holds(at, &c));
        assert!(packed.holds(next, &click(10, 1_000, "5", "6", v4)));
        for other in [
            click(9, 1_000, "12", "345", v4),
            click(9, 1_000, "12", "3", v4),
            click(9, 1_000, "012", "34", v4),
            click(9, 1_001, "12", "34", v4),
            Click {
                cpc_micros: 1,
                ..c.clone()
            },
            Click {
                ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
                ..c.clone()
            },
        ] {
            assert!(!packed.holds(at, &other), "{other:?}");
        }
    }

    #[test]
    fn copies_change_in_place() {
        let mut packed = PackedClicks::default();
        let c = click(9, 1_000, "1", "2", IpAddr::V4(Ipv4Addr::LOCALHOST));
        let at = packed.push(&c, 2);
        assert_eq!(packed.copies(at), 2);
        packed.set_copies(at, 7);
        assert_eq!(packed.copies(at), 7);
        assert_eq!(packed.get(at), c);
    }

    /// Fills several chunks, removes most of each, and checks that every click left is
    /// still found where the moves said, against a plain map of what should be there.
    #[test]
    fn compaction_moves_live_clicks_and_reports_where() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let mut packed = PackedClicks::default();
        let mut at: HashMap<u128, ClickRef> = HashMap::new();
        let mut expected: HashMap<u128, Click> = HashMap::new();
        let n = 200_000u128;
        for imp in 0..n {
            let c = click(imp, 1_000 + imp as u64, &imp.to_string(), "u", ip);
            at.insert(imp, packed.push(&c, 1));
            expected.insert(imp, c);
        }
        assert!(packed.chunks.len() > 3);
        for imp in (0..n).filter(|i| i % 5 != 0) {
            let Some(r) = at.remove(&imp) else {
                panic!("{imp} was stored");
            };
            let Some(c) = expected.remove(&imp) else {
                panic!("{imp} was expected");
            };
            assert!(packed.holds(r, &c));
            packed.remove(r, |moved, from, to| {
                assert_eq!(at.get(&moved), Some(&from));
                at.insert(moved, to);
            });
        }
        assert_eq!(packed.len(), expected.len());
        for (imp, c) in &expected {
            assert_eq!(&packed.get(at[imp]), c);
        }
        // Compaction freed the chunks it emptied: every chunk held but the head is more
        // than half live.
        let live: usize = packed.chunks.iter().flatten().map(|c| c.live).sum();
        let held = packed.chunks.iter().flatten().count();
        assert!(
            (held - 1) * (CHUNK_BYTES / 2 - 64) <= live,
            "{held} chunks, {live} live"
        );
        assert!(!packed.spare.is_empty());
    }

    fn any_click() -> impl Strategy<Value = Click> {
        let id = prop_oneof![
            any::<u64>().prop_map(|n| n.to_string()),
            "[0-9]{0,22}",
            ".{0,40}",
        ];
        let ip = prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u8; 16]>().prop_map(|o| IpAddr::V6(Ipv6Addr::from(o))),
        ];
        (
            (any::<u128>(), any::<u64>(), any::<u64>(), any::<u64>()),
            (id.clone(), id, ip, any::<u64>()),
        )
            .prop_map(
                |((imp, ad, event, record), (click_id, user_id, ip, cpc))| Click {
                    impression_id: imp,
                    ad_id: ad,
                    event_time_ms: event,
                    record_time_ms: record,
                    click_id: SmolStr::new(click_id),
                    user_id: SmolStr::new(user_id),
                    ip,
                    cpc_micros: cpc,
                },
            )
    }

    proptest! {
        /// Any click comes back field for field, in whichever chunk it lands, and a
        /// chunk holds a click exactly when it is equal to the one stored.
        #[test]
        fn any_click_round_trips(clicks in prop::collection::vec(any_click(), 1..40)) {
            let mut packed = PackedClicks::default();
            let refs: Vec<_> = clicks.iter().map(|c| packed.push(c, 1)).collect();
            for (c, at) in clicks.iter().zip(&refs) {
                prop_assert_eq!(&packed.get(*at), c);
                prop_assert_eq!(packed.impression(*at), c.impression_id);
                for other in &clicks {
                    prop_assert_eq!(packed.holds(*at, other), other == c);
                }
            }
        }
    }
}
