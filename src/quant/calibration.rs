//! Calibration windows (DESIGN §4): `samples` windows of `seq_len` tokens cut at seeded random
//! offsets from a tokenized dataset, as GPTQ's data loaders do (a uniform start in
//! [0, len − seq_len)), so the same dataset, seed and sizes always give the same windows, and
//! another tool can be fed exactly these.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the dataset has {tokens} tokens; calibration windows of {seq_len} need more")]
pub struct TooShort {
    pub tokens: usize,
    pub seq_len: usize,
}

/// Start offsets of the windows.
pub fn window_starts(
    tokens: usize,
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<usize>, TooShort> {
    if seq_len == 0 || tokens <= seq_len {
        return Err(TooShort { tokens, seq_len });
    }
    let mut rng = StdRng::seed_from_u64(seed);
    Ok((0..samples)
        .map(|_| rng.gen_range(0..tokens - seq_len))
        .collect())
}

/// The windows themselves.
pub fn windows(
    tokens: &[u32],
    samples: usize,
    seq_len: usize,
    seed: u64,
) -> Result<Vec<&[u32]>, TooShort> {
    Ok(window_starts(tokens.len(), samples, seq_len, seed)?
        .into_iter()
        .map(|s| &tokens[s..s + seq_len])
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_seeded_in_range_and_refuse_short_texts() {
        let tokens: Vec<u32> = (0..10_000).collect();
        let a = windows(&tokens, 128, 512, 42).unwrap();
        assert_eq!(a.len(), 128);
        assert!(a.iter().all(|w| w.len() == 512));
        // Windows are contiguous slices of the text.
        assert!(a.iter().all(|w| w[511] == w[0] + 511));
        assert_eq!(a, windows(&tokens, 128, 512, 42).unwrap());
        assert_ne!(a, windows(&tokens, 128, 512, 43).unwrap());
        assert_eq!(
            windows(&tokens[..512], 1, 512, 0).unwrap_err(),
            TooShort {
                tokens: 512,
                seq_len: 512
            }
        );
    }
}
