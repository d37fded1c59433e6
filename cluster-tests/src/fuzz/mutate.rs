//! Mutations of valid input: the edits a corrupted, truncated or hostile copy of a real message
//! shows.

use rand::Rng;
use rand::rngs::StdRng;

/// Applies one to three random mutations to `input` (never returns it unchanged unless empty).
pub fn mutate(rng: &mut StdRng, mut input: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=3) {
        input = mutate_once(rng, input);
    }
    input
}

/// One single-bit flip: the corruption that exposes the subtlest decoder bugs.
pub fn flip_bit(rng: &mut StdRng, mut input: Vec<u8>) -> Vec<u8> {
    if !input.is_empty() {
        let i = rng.random_range(0..input.len());
        input[i] ^= 1 << rng.random_range(0..8);
    }
    input
}

fn mutate_once(rng: &mut StdRng, mut v: Vec<u8>) -> Vec<u8> {
    if v.is_empty() {
        v.push(rng.random());
        return v;
    }
    let len = v.len();
    match rng.random_range(0..10) {
        0..=2 => flip_bit(rng, v),
        3 => {
            let i = rng.random_range(0..len);
            v[i] = rng.random();
            v
        }
        4 => {
            // an interesting byte: varint boundaries, lib0 Any tags, block info bits
            const INTERESTING: [u8; 12] = [0, 1, 0x7f, 0x80, 0xff, 116, 117, 118, 119, 7, 8, 10];
            let i = rng.random_range(0..len);
            v[i] = INTERESTING[rng.random_range(0..INTERESTING.len())];
            v
        }
        5 => {
            v.truncate(rng.random_range(0..len));
            v
        }
        6 => {
            // duplicate a region (repeated blocks, repeated entries)
            let a = rng.random_range(0..len);
            let b = rng.random_range(a..=len.min(a + 64));
            let chunk = v[a..b].to_vec();
            let at = rng.random_range(0..=len);
            v.splice(at..at, chunk);
            v
        }
        7 => {
            // delete a region
            let a = rng.random_range(0..len);
            let b = rng.random_range(a..=len.min(a + 16));
            v.drain(a..b);
            v
        }
        8 => {
            // a huge length prefix (allocation bomb)
            let at = rng.random_range(0..=len);
            let bomb: &[u8] = match rng.random_range(0..3) {
                0 => &[0xff, 0xff, 0xff, 0xff, 0x0f],
                1 => &[0x80, 0x80, 0x80, 0x80, 0x01],
                _ => &[0xff, 0xff, 0xff, 0x7f],
            };
            v.splice(at..at, bomb.iter().copied());
            v
        }
        _ => {
            // random bytes inserted
            let at = rng.random_range(0..=len);
            let n = rng.random_range(1..8);
            let junk: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            v.splice(at..at, junk);
            v
        }
    }
}
