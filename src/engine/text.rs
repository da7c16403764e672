//! From tokens to streamed text: incremental detokenization that never emits half a UTF-8
//! character, and stop strings that may span tokens (text that could be the start of a stop
//! string is held back until it is known not to be).

use tokenizers::Tokenizer;

/// Decodes a growing token list piece by piece, as text-generation-inference does: decode a
/// short window before and after the new tokens and emit the difference, so byte-level BPE
/// tokens that split a character wait for the rest of it.
pub struct IncrementalDecoder {
    tokens: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// `context`: tokens already there (the prompt), so the first piece gets the right spacing.
    pub fn new(context: &[u32]) -> Self {
        let keep = context.len().min(5);
        Self {
            tokens: context[context.len() - keep..].to_vec(),
            prefix_offset: 0,
            read_offset: keep,
        }
    }

    /// The text the new token completes (often empty mid-character).
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> String {
        self.tokens.push(token);
        self.take(tokenizer, false)
    }

    /// Whatever is still held (a trailing partial character comes out as U+FFFD).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> String {
        self.take(tokenizer, true)
    }

    fn take(&mut self, tokenizer: &Tokenizer, last: bool) -> String {
        let decode = |t: &[u32]| tokenizer.decode(t, true).unwrap_or_default();
        let prefix = decode(&self.tokens[self.prefix_offset..self.read_offset]);
        let full = decode(&self.tokens[self.prefix_offset..]);
        if full.ends_with('\u{FFFD}') && !last {
            return String::new();
        }
        // Only what follows the text already sent: the windows usually share all of `prefix`,
        // but not when `prefix` ended in half a character that `full` completes.
        let mut common = prefix
            .bytes()
            .zip(full.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        while !full.is_char_boundary(common) {
            common -= 1;
        }
        if full.len() <= common {
            return String::new();
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.tokens.len();
        full[common..].to_string()
    }
}

/// Accumulates generated text and releases what can no longer turn into a stop string.
pub struct StopMatcher {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

pub enum StopCheck {
    /// Text safe to emit now (possibly empty).
    Continue(String),
    /// A stop string was found: the text before it that is still to be emitted.
    Stopped(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            text: String::new(),
            emitted: 0,
        }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        let search_from = self.emitted;
        self.text.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        if let Some(at) = found {
            let end = search_from + at;
            let out = self.text[self.emitted..end].to_string();
            self.text.truncate(end);
            self.emitted = end;
            return StopCheck::Stopped(out);
        }
        let hold = self.held_back();
        let end = self.text.len() - hold;
        let out = self.text[self.emitted..end].to_string();
        self.emitted = end;
        StopCheck::Continue(out)
    }

    /// Whatever is still held back (at the end of the generation).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.emitted..];
        let mut best = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && tail.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            match m.push(p) {
                StopCheck::Continue(t) => out.push(t),
                StopCheck::Stopped(t) => {
                    out.push(t);
                    return (out, true);
                }
            }
        }
        out.push(m.flush());
        (out, false)
    }

    #[test]
    fn a_stop_string_spanning_pieces_is_found_and_never_emitted() {
        let (out, stopped) = run(&["END"], &["Hello E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello ");
        // "E" was held back until it was known to start "END".
        assert_eq!(out[0], "Hello ");
    }

    #[test]
    fn held_back_text_is_released_when_it_cannot_be_a_stop() {
        let (out, stopped) = run(&["END"], &["ab E", "x", "yz"]);
        assert!(!stopped);
        assert_eq!(out, vec!["ab ", "Ex", "yz", ""]);
    }

    #[test]
    fn the_earliest_of_several_stops_wins_and_multibyte_text_is_safe() {
        let (out, stopped) = run(&["\n\n", "é!"], &["caf", "é", "! then\n\n"]);
        assert!(stopped);
        assert_eq!(out.concat(), "caf");
    }
}
