//! `alphabets.tsv`: which rows of each Omniglot split belong to which alphabet.
//!
//! A header line `set alphabet first_char_id last_char_id n_chars first_row last_row`, then one line per
//! alphabet. [`parse`] returns, for one split, each row's alphabet number (in file order), after checking
//! that the alphabets' row ranges are well formed, do not overlap and cover the split's rows exactly.

use super::AlphabetError;

/// Longest file accepted (the real one is 2 KB).
pub const MAX_BYTES: usize = 1 << 20;

/// Alphabet number of every row `0..n_chars` of split `set` (`background` or `evaluation`).
pub fn parse(text: &str, set: &str, n_chars: usize) -> Result<Vec<u32>, AlphabetError> {
    if text.len() > MAX_BYTES {
        return Err(AlphabetError::TooLarge(text.len()));
    }
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.split('\t').next() == Some("set") => {}
        _ => return Err(AlphabetError::Line { line: 1, why: "expected the header `set\talphabet\t…`".into() }),
    }
    let mut of_row: Vec<Option<u32>> = vec![None; n_chars];
    let mut alphabet = 0u32;
    for (i, line) in lines {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 7 {
            return Err(AlphabetError::Line {
                line: line_no,
                why: format!("expected 7 tab-separated fields, got {}", f.len()),
            });
        }
        if f[0] != set {
            continue;
        }
        let num = |k: usize| {
            f[k].trim().parse::<usize>().map_err(|_| AlphabetError::Line {
                line: line_no,
                why: format!("field {} ({:?}) is not a non-negative integer", k + 1, f[k]),
            })
        };
        let (count, first, last) = (num(4)?, num(5)?, num(6)?);
        if first > last || last - first + 1 != count || last >= n_chars {
            return Err(AlphabetError::Line {
                line: line_no,
                why: format!("rows {first}..={last} ({count} characters) do not fit a split of {n_chars} rows"),
            });
        }
        for row in &mut of_row[first..=last] {
            if row.is_some() {
                return Err(AlphabetError::Line { line: line_no, why: "rows overlap an earlier alphabet".into() });
            }
            *row = Some(alphabet);
        }
        alphabet += 1;
    }
    of_row.iter().enumerate().map(|(row, a)| a.ok_or(AlphabetError::Uncovered { set: set.to_string(), row })).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "set\talphabet\tfirst_char_id\tlast_char_id\tn_chars\tfirst_row\tlast_row\n";

    #[test]
    fn rows_get_their_alphabet() {
        let t =
            format!("{HEAD}background\tA\t1\t2\t2\t0\t1\nevaluation\tC\t4\t4\t1\t0\t0\nbackground\tB\t3\t3\t1\t2\t2\n");
        assert_eq!(parse(&t, "background", 3).unwrap(), vec![0, 0, 1]);
        assert_eq!(parse(&t, "evaluation", 1).unwrap(), vec![0]);
    }

    #[test]
    fn malformed_files_are_refused() {
        assert!(parse("nonsense", "background", 1).is_err());
        let gap = format!("{HEAD}background\tA\t1\t1\t1\t0\t0\n");
        assert!(matches!(parse(&gap, "background", 2), Err(AlphabetError::Uncovered { row: 1, .. })));
        let overlap = format!("{HEAD}background\tA\t1\t2\t2\t0\t1\nbackground\tB\t2\t2\t1\t1\t1\n");
        assert!(parse(&overlap, "background", 2).is_err());
        let outside = format!("{HEAD}background\tA\t1\t9\t9\t0\t8\n");
        assert!(parse(&outside, "background", 2).is_err());
        let bad_count = format!("{HEAD}background\tA\t1\t2\t5\t0\t1\n");
        assert!(parse(&bad_count, "background", 2).is_err());
        let short = format!("{HEAD}background\tA\t1\n");
        assert!(parse(&short, "background", 2).is_err());
    }

    #[test]
    fn the_shipped_file_covers_both_splits() {
        let Some(path) = crate::datadir::omniglot_file_for_tests("alphabets.tsv") else { return };
        let text = std::fs::read_to_string(&path).expect("alphabets.tsv reads");
        let bg = parse(&text, "background", 964).unwrap();
        let ev = parse(&text, "evaluation", 659).unwrap();
        assert_eq!(bg.iter().max(), Some(&29));
        assert_eq!(ev.iter().max(), Some(&19));
    }
}
