//! Reading newline-terminated lines with a length cap.

use std::io::{self, BufRead};

/// What [`read_line_capped`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A line is in the buffer (without its `\n`; a last line without `\n` counts too).
    Line,
    /// The peer closed the stream before sending anything more.
    Eof,
    /// The line was longer than the cap and was thrown away. `resynced` says whether its
    /// terminating `\n` was found (the stream can go on) or the discard cap or EOF was hit
    /// first (the stream must be closed).
    TooLong { resynced: bool },
}

/// Reads one line into `buf` (cleared first), at most `max` bytes. A longer line is read
/// on and discarded up to its `\n`, but at most `discard_cap` further bytes.
pub(crate) fn read_line_capped(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
    discard_cap: usize,
) -> io::Result<LineRead> {
    buf.clear();
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        match avail.iter().position(|&b| b == b'\n') {
            Some(pos) => {
                if buf.len() + pos > max {
                    r.consume(pos + 1);
                    buf.clear();
                    return Ok(LineRead::TooLong { resynced: true });
                }
                buf.extend_from_slice(&avail[..pos]);
                r.consume(pos + 1);
                return Ok(LineRead::Line);
            }
            None => {
                let n = avail.len();
                if buf.len() + n > max {
                    r.consume(n);
                    buf.clear();
                    let resynced = discard_to_newline(r, discard_cap)?;
                    return Ok(LineRead::TooLong { resynced });
                }
                buf.extend_from_slice(avail);
                r.consume(n);
            }
        }
    }
}

/// Discards input up to and including the next `\n`; false if `cap` bytes or EOF came first.
fn discard_to_newline(r: &mut impl BufRead, cap: usize) -> io::Result<bool> {
    let mut discarded = 0usize;
    loop {
        let avail = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if avail.is_empty() {
            return Ok(false);
        }
        if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
            r.consume(pos + 1);
            return Ok(true);
        }
        let n = avail.len();
        r.consume(n);
        discarded += n;
        if discarded >= cap {
            return Ok(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn lines(input: &[u8], max: usize, cap: usize) -> Vec<(LineRead, Vec<u8>)> {
        // A tiny buffer so lines straddle fill_buf calls.
        let mut r = BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let l = read_line_capped(&mut r, &mut buf, max, cap).unwrap();
            let done = matches!(l, LineRead::Eof | LineRead::TooLong { resynced: false });
            out.push((l, buf.clone()));
            if done {
                return out;
            }
        }
    }

    #[test]
    fn splits_lines_and_keeps_a_last_unterminated_one() {
        let got = lines(b"ab\n\nlonger line\nend", 100, 100);
        assert_eq!(
            got,
            vec![
                (LineRead::Line, b"ab".to_vec()),
                (LineRead::Line, b"".to_vec()),
                (LineRead::Line, b"longer line".to_vec()),
                (LineRead::Line, b"end".to_vec()),
                (LineRead::Eof, b"".to_vec()),
            ]
        );
    }

    #[test]
    fn a_line_of_exactly_max_is_accepted() {
        let got = lines(b"12345\n123456\nok\n", 5, 100);
        assert_eq!(got[0], (LineRead::Line, b"12345".to_vec()));
        assert_eq!(got[1], (LineRead::TooLong { resynced: true }, vec![]));
        assert_eq!(got[2], (LineRead::Line, b"ok".to_vec()));
    }

    #[test]
    fn an_endless_line_stops_at_the_discard_cap() {
        let input = vec![b'x'; 1000];
        let got = lines(&input, 10, 50);
        assert_eq!(got, vec![(LineRead::TooLong { resynced: false }, vec![])]);
        let got = lines(b"xxxxxxxxxxxxxxxxxxxx", 10, 1000);
        assert_eq!(got, vec![(LineRead::TooLong { resynced: false }, vec![])]);
    }
}
