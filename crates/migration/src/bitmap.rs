//! A page set: one bit per 4 KiB guest page, with the range operations the pre-copy engine
//! needs (runs of set bits, clearing ranges, "clear unless still pending").

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BitmapError {
    #[error(
        "dirty bitmap covers {got} pages but guest memory has {expected} pages: the source's \
         take_dirty_log() must return a bitmap sized for the whole guest RAM"
    )]
    SizeMismatch { expected: u64, got: u64 },
}

/// A set of guest page numbers in `0..pages`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageSet {
    pages: u64,
    words: Vec<u64>,
}

impl PageSet {
    /// The empty set over `pages` pages.
    pub fn new(pages: u64) -> Self {
        PageSet {
            pages,
            words: vec![0; pages.div_ceil(64) as usize],
        }
    }

    /// The set of all `pages` pages.
    pub fn full(pages: u64) -> Self {
        let mut s = PageSet::new(pages);
        s.set_range(0, pages);
        s
    }

    /// Build a set from dirty-log words (bit `i % 64` of word `i / 64` is page `i`, the
    /// layout of `esvm_hv::DirtyBitmap::words()` and of KVM's dirty log). Missing words count
    /// as clear; bits beyond `pages` and extra words are ignored.
    pub fn from_words(pages: u64, words: &[u64]) -> Self {
        let mut s = PageSet::new(pages);
        for (dst, src) in s.words.iter_mut().zip(words) {
            *dst = *src;
        }
        s.clear_tail();
        s
    }

    /// Check that a dirty log from a source covers exactly `pages` pages.
    pub fn check_size(&self, pages: u64) -> Result<(), BitmapError> {
        if self.pages != pages {
            return Err(BitmapError::SizeMismatch {
                expected: pages,
                got: self.pages,
            });
        }
        Ok(())
    }

    fn clear_tail(&mut self) {
        let rem = self.pages % 64;
        if rem != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << rem) - 1;
            }
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    pub fn clear(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// `self |= other` (sizes must match; extra words of a larger `other` are ignored).
    pub fn union(&mut self, other: &PageSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.clear_tail();
    }

    pub fn set_range(&mut self, first: u64, count: u64) {
        for (w, m) in range_masks(self.pages, first, count) {
            self.words[w] |= m;
        }
    }

    pub fn clear_range(&mut self, first: u64, count: u64) {
        for (w, m) in range_masks(self.pages, first, count) {
            self.words[w] &= !m;
        }
    }

    /// Clear the pages of `first..first+count` that are *not* in `keep`.
    pub fn clear_range_unless(&mut self, first: u64, count: u64, keep: &PageSet) {
        for (w, m) in range_masks(self.pages, first, count) {
            let kept = keep.words.get(w).copied().unwrap_or(0);
            self.words[w] &= !(m & !kept);
        }
    }

    /// The first set page at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                return Some(w as u64 * 64 + bits.trailing_zeros() as u64);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            bits = self.words[w];
        }
    }

    /// How many consecutive pages starting at `from` are set, at most `max`.
    pub fn run_len(&self, from: u64, max: u64) -> u64 {
        let mut n = 0;
        let mut p = from;
        while n < max && p < self.pages {
            let w = (p / 64) as usize;
            let shift = p % 64;
            let bits = self.words[w] >> shift;
            let ones = (!bits).trailing_zeros() as u64; // set bits from p upwards in this word
            let ones = ones.min(64 - shift);
            if ones == 0 {
                break;
            }
            let take = ones.min(max - n);
            n += take;
            p += take;
            if take < 64 - shift {
                break;
            }
        }
        n
    }

    /// Iterate over set pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros() as u64;
                w &= w - 1;
                Some(i as u64 * 64 + bit)
            })
        })
    }
}

/// `(word index, mask)` for each word touched by `first..first+count`, clamped to `pages`.
fn range_masks(pages: u64, first: u64, count: u64) -> impl Iterator<Item = (usize, u64)> {
    let end = first.saturating_add(count).min(pages);
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let word = p / 64;
        let lo = p % 64;
        let hi = (end - word * 64).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        p = word * 64 + hi;
        Some((word as usize, mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges_and_runs() {
        let mut s = PageSet::new(200);
        s.set_range(10, 100);
        assert_eq!(s.count(), 100);
        assert_eq!(s.next_set(0), Some(10));
        assert_eq!(s.run_len(10, 1000), 100);
        assert_eq!(s.run_len(10, 37), 37);
        assert_eq!(s.run_len(109, 5), 1);
        assert_eq!(s.run_len(110, 5), 0);
        s.clear_range(50, 10);
        assert_eq!(s.run_len(10, 1000), 40);
        assert_eq!(s.next_set(50), Some(60));
        assert_eq!(s.next_set(110), None);
        let full = PageSet::full(70);
        assert_eq!(full.count(), 70);
        assert_eq!(full.run_len(0, u64::MAX), 70);
        assert_eq!(full.next_set(70), None);
    }

    #[test]
    fn clear_unless_keeps_pending_pages() {
        let mut t = PageSet::full(130);
        let mut keep = PageSet::new(130);
        keep.set(5);
        keep.set(128);
        t.clear_range_unless(0, 130, &keep);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![5, 128]);
    }

    #[test]
    fn words_round_trip_and_size_check() {
        let mut d = PageSet::new(100);
        d.set(3);
        d.set(99);
        let s = PageSet::from_words(100, d.words());
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![3, 99]);
        assert_eq!(s, d);
        // bits beyond the size are dropped
        let t = PageSet::from_words(4, &[u64::MAX, 7]);
        assert_eq!(t.count(), 4);
        assert_eq!(s.check_size(100), Ok(()));
        assert_eq!(
            s.check_size(101),
            Err(BitmapError::SizeMismatch {
                expected: 101,
                got: 100
            })
        );
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_set(bits in proptest::collection::vec(any::<bool>(), 1..400),
                                      max in 1u64..80) {
            let mut s = PageSet::new(bits.len() as u64);
            for (i, b) in bits.iter().enumerate() {
                if *b { s.set(i as u64); }
            }
            let mut seen = Vec::new();
            let mut cur = 0;
            while let Some(p) = s.next_set(cur) {
                let n = s.run_len(p, max);
                prop_assert!(n >= 1 && n <= max);
                seen.extend(p..p + n);
                cur = p + n;
            }
            prop_assert_eq!(seen, s.iter().collect::<Vec<_>>());
        }

        #[test]
        fn range_ops_match_model(n in 1u64..300, first in 0u64..320, count in 0u64..320) {
            let mut s = PageSet::new(n);
            s.set_range(first, count);
            for p in 0..n {
                prop_assert_eq!(s.is_set(p), p >= first && p < first + count);
            }
            let mut f = PageSet::full(n);
            f.clear_range(first, count);
            for p in 0..n {
                prop_assert_eq!(f.is_set(p), !(p >= first && p < first + count));
            }
        }
    }
}
