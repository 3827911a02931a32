//! Topic patterns with RabbitMQ semantics, and the overlap check that keeps a
//! task from being routed to two queues.
//!
//! A pattern is a list of words separated by `.`; `*` stands for exactly one
//! word and `#` for zero or more words, as in a RabbitMQ topic binding. A
//! task type is the routing key a pattern is matched against: plain words,
//! no wildcards.

/// Longest routing key or binding key AMQP can carry (a short string).
const MAX_KEY_BYTES: usize = 255;

/// Longest task type, in bytes. Events are routed by `<state>.<task type>`
/// and an AMQP routing key holds at most 255 bytes, so a type must leave
/// room for the longest state word and its dot.
pub const MAX_TYPE_BYTES: usize = 200;

/// Placeholder word used in overlap examples where any word would do.
const ANY_WORD: &str = "x";

/// One word of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    Word(&'a str),
    /// `*`: exactly one word.
    One,
    /// `#`: zero or more words.
    Many,
}

fn tokens(pattern: &str) -> Vec<Token<'_>> {
    pattern
        .split('.')
        .map(|w| match w {
            "*" => Token::One,
            "#" => Token::Many,
            w => Token::Word(w),
        })
        .collect()
}

fn is_word(w: &str) -> bool {
    !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks that `p` is a topic pattern Warren accepts: non-empty words
/// separated by `.`, each word `[A-Za-z0-9_-]+`, `*` or `#`, at most 255
/// bytes. The error says what is wrong, for use in a config message.
pub fn is_valid_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("a pattern must not be empty (use \"#\" to match every type)".into());
    }
    if p.len() > MAX_KEY_BYTES {
        return Err(format!(
            "a pattern is at most {MAX_KEY_BYTES} bytes (AMQP limit), this one is {}",
            p.len()
        ));
    }
    for (i, w) in p.split('.').enumerate() {
        if w.is_empty() {
            return Err(format!(
                "word {} is empty: words are separated by single dots, with none at either end",
                i + 1
            ));
        }
        if w != "*" && w != "#" && !is_word(w) {
            return Err(format!(
                "word {} ({w:?}) is not allowed: a word is letters, digits, '_' and '-', \
                 or exactly '*' (one word) or '#' (zero or more words)",
                i + 1
            ));
        }
    }
    Ok(())
}

/// Whether `t` is a valid task type: non-empty words of `[A-Za-z0-9_-]`
/// separated by `.`, no wildcards, at most [`MAX_TYPE_BYTES`].
pub fn is_valid_task_type(t: &str) -> bool {
    // One pass over the bytes (this runs for every task): word bytes, and
    // dots each between two of them.
    let b = t.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
    !b.is_empty()
        && b.len() <= MAX_TYPE_BYTES
        && word(b[0])
        && word(b[b.len() - 1])
        && b.iter().all(|&c| word(c) || c == b'.')
        && !b.windows(2).any(|w| w == b"..")
}

/// Whether the topic `pattern` matches `task_type`, with RabbitMQ semantics
/// (`*` is exactly one word, `#` zero or more).
pub fn matches(pattern: &str, task_type: &str) -> bool {
    let pat = tokens(pattern);
    let words: Vec<&str> = task_type.split('.').collect();
    // reach[i]: the pattern prefix of length i matches the words read so far.
    let mut reach = vec![false; pat.len() + 1];
    reach[0] = true;
    close_over_many(&pat, &mut reach);
    for word in words {
        let mut next = vec![false; pat.len() + 1];
        for (i, tok) in pat.iter().enumerate() {
            if !reach[i] {
                continue;
            }
            match tok {
                Token::Many => next[i] = true,
                Token::One => next[i + 1] = true,
                Token::Word(w) if *w == word => next[i + 1] = true,
                Token::Word(_) => {}
            }
        }
        close_over_many(&pat, &mut next);
        reach = next;
    }
    reach[pat.len()]
}

/// A `#` may match zero words: whoever reaches it also reaches past it.
fn close_over_many(pat: &[Token<'_>], reach: &mut [bool]) {
    for (i, tok) in pat.iter().enumerate() {
        if reach[i] && *tok == Token::Many {
            reach[i + 1] = true;
        }
    }
}

/// If some task type of at least one word is matched by both patterns,
/// returns one such type, else `None`. Wildcard positions are filled with
/// the word `x`. Exact: the search runs over the product of both patterns'
/// automata, so there are no false positives or negatives.
pub fn overlap_example(a: &str, b: &str) -> Option<String> {
    let pa = tokens(a);
    let pb = tokens(b);
    let (la, lb) = (pa.len(), pb.len());
    // State (i, j, read): i tokens of a and j of b consumed; `read` says
    // whether at least one word has been read (task types are never empty).
    let index = |i: usize, j: usize, read: bool| ((i * (lb + 1)) + j) * 2 + usize::from(read);
    let states = (la + 1) * (lb + 1) * 2;
    // For each reached state: the state it was reached from and the word
    // read on the way (None for a step that skips a `#`).
    let mut parent: Vec<Option<(usize, Option<String>)>> = vec![None; states];
    let mut seen = vec![false; states];
    let start = index(0, 0, false);
    seen[start] = true;
    let mut queue = std::collections::VecDeque::from([(0usize, 0usize, false)]);
    let goal = index(la, lb, true);

    while let Some((i, j, read)) = queue.pop_front() {
        let here = index(i, j, read);
        if here == goal {
            break;
        }
        let mut push = |ni: usize, nj: usize, nread: bool, word: Option<String>| {
            let k = index(ni, nj, nread);
            if !seen[k] {
                seen[k] = true;
                parent[k] = Some((here, word));
                queue.push_back((ni, nj, nread));
            }
        };
        // Let a `#` match zero (more) words.
        if i < la && pa[i] == Token::Many {
            push(i + 1, j, read, None);
        }
        if j < lb && pb[j] == Token::Many {
            push(i, j + 1, read, None);
        }
        // Read one word, chosen to satisfy both sides.
        if i < la && j < lb {
            let word = match (pa[i], pb[j]) {
                (Token::Word(x), Token::Word(y)) => (x == y).then_some(x),
                (Token::Word(x), _) | (_, Token::Word(x)) => Some(x),
                _ => Some(ANY_WORD),
            };
            if let Some(word) = word {
                let ni = if pa[i] == Token::Many { i } else { i + 1 };
                let nj = if pb[j] == Token::Many { j } else { j + 1 };
                push(ni, nj, true, Some(word.to_string()));
            }
        }
    }

    if !seen[goal] {
        return None;
    }
    let mut words = Vec::new();
    let mut at = goal;
    while let Some((from, word)) = &parent[at] {
        if let Some(word) = word {
            words.push(word.clone());
        }
        at = *from;
    }
    words.reverse();
    Some(words.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_patterns() {
        for p in ["a", "diag.*", "http.#", "#", "*", "#.#", "a.*.b", "A-b_9.x"] {
            assert_eq!(is_valid_pattern(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn invalid_patterns_say_why() {
        assert!(is_valid_pattern("")
            .unwrap_err()
            .contains("must not be empty"));
        assert!(is_valid_pattern("a..b")
            .unwrap_err()
            .contains("word 2 is empty"));
        assert!(is_valid_pattern(".a")
            .unwrap_err()
            .contains("word 1 is empty"));
        assert!(is_valid_pattern("a.")
            .unwrap_err()
            .contains("word 2 is empty"));
        let err = is_valid_pattern("a.b*").unwrap_err();
        assert!(err.contains("word 2 (\"b*\") is not allowed"), "{err}");
        assert!(is_valid_pattern("a b").is_err());
        assert!(is_valid_pattern("a.##").is_err());
        let long = "a".repeat(256);
        assert!(is_valid_pattern(&long)
            .unwrap_err()
            .contains("at most 255 bytes"));
    }

    #[test]
    fn task_types() {
        assert!(is_valid_task_type("diag.echo"));
        assert!(is_valid_task_type("x"));
        assert!(is_valid_task_type("http.request-v2_1"));
        assert!(!is_valid_task_type(""));
        assert!(!is_valid_task_type("diag.*"));
        assert!(!is_valid_task_type("diag.#"));
        assert!(!is_valid_task_type("diag..echo"));
        assert!(!is_valid_task_type(".diag"));
        assert!(!is_valid_task_type("diag."));
        assert!(!is_valid_task_type("diag echo"));
        assert!(is_valid_task_type(&"a".repeat(MAX_TYPE_BYTES)));
        // Its events' routing keys would not fit AMQP's 255 bytes.
        assert!(!is_valid_task_type(&"a".repeat(MAX_TYPE_BYTES + 1)));
        assert!(!is_valid_task_type(&"a".repeat(255)));
    }

    #[test]
    fn matching_follows_rabbitmq() {
        let cases = [
            ("diag.*", "diag.echo", true),
            ("diag.*", "diag", false),
            ("diag.*", "diag.echo.more", false),
            ("diag.#", "diag", true),
            ("diag.#", "diag.echo.more", true),
            ("#", "anything.at.all", true),
            ("#", "x", true),
            ("*", "x", true),
            ("*", "x.y", false),
            ("#.end", "end", true),
            ("#.end", "a.b.end", true),
            ("#.end", "a.b.end.no", false),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.b.b.c", true),
            ("a.#.c", "a.b", false),
            ("#.#", "a", true),
            ("*.#.*", "a", false),
            ("*.#.*", "a.b", true),
            ("a.b", "a.b", true),
            ("a.b", "a.c", false),
            ("a.b", "A.b", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(matches(p, t), want, "{p} vs {t}");
        }
    }

    fn assert_overlap(a: &str, b: &str) -> String {
        let ex = overlap_example(a, b).unwrap_or_else(|| panic!("{a} and {b} should overlap"));
        assert!(matches(a, &ex) && matches(b, &ex), "{a} {b} -> {ex}");
        assert!(is_valid_task_type(&ex), "{ex}");
        assert!(overlap_example(b, a).is_some(), "symmetry {a} {b}");
        ex
    }

    #[test]
    fn overlap_examples() {
        assert_overlap("#", "diag.echo");
        assert_overlap("#", "*");
        assert_overlap("#", "#");
        assert_overlap("#.#", "a");
        assert_eq!(assert_overlap("a.*", "a.#"), "a.x");
        assert_eq!(assert_overlap("*.b", "a.*"), "a.b");
        assert_overlap("a.#.c", "a.b.#");
        assert_eq!(assert_overlap("diag.#", "diag.echo"), "diag.echo");
        assert_eq!(assert_overlap("diag.*", "diag.echo"), "diag.echo");
        assert_eq!(assert_overlap("a.#", "#.b"), "a.b");
        assert_eq!(assert_overlap("a.#", "a"), "a");
    }

    #[test]
    fn disjoint_patterns() {
        for (a, b) in [
            ("a.b", "a.c"),
            ("diag.*", "http.*"),
            ("a.*", "a"),
            ("a.*", "a.*.*"),
            ("*.*.#", "*"),
            ("a.#", "b.#"),
            ("#.a", "#.b"),
        ] {
            assert_eq!(overlap_example(a, b), None, "{a} {b}");
            assert_eq!(overlap_example(b, a), None, "{b} {a}");
        }
    }

    /// Reference matcher written the obvious recursive way.
    fn naive_matches(pat: &[&str], words: &[&str]) -> bool {
        match pat.split_first() {
            None => words.is_empty(),
            Some((&"#", rest)) => (0..=words.len()).any(|k| naive_matches(rest, &words[k..])),
            Some((&p, rest)) => match words.split_first() {
                Some((w, ws)) => (p == "*" || p == *w) && naive_matches(rest, ws),
                None => false,
            },
        }
    }

    fn all_sequences(alphabet: &[&str], max_len: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut layer = vec![String::new()];
        for _ in 0..max_len {
            let mut next = Vec::new();
            for prefix in &layer {
                for w in alphabet {
                    next.push(if prefix.is_empty() {
                        w.to_string()
                    } else {
                        format!("{prefix}.{w}")
                    });
                }
            }
            out.extend(next.iter().cloned());
            layer = next;
        }
        out
    }

    /// Compares against brute force over every type of up to 4 words from
    /// {a, b, c}, for every pattern of up to 3 tokens over {a, b, *, #}. Two
    /// such patterns that overlap always share a type of at most 4 words
    /// (each word of a shortest common type is read by a non-`#` token of
    /// one pattern), and `c` stands for "a word neither pattern names".
    #[test]
    fn overlap_agrees_with_brute_force() {
        let patterns = all_sequences(&["a", "b", "*", "#"], 3);
        let types = all_sequences(&["a", "b", "c"], 4);
        for t in &types {
            let words: Vec<&str> = t.split('.').collect();
            for p in &patterns {
                let pat: Vec<&str> = p.split('.').collect();
                assert_eq!(matches(p, t), naive_matches(&pat, &words), "{p} vs {t}");
            }
        }
        let matched: Vec<Vec<bool>> = patterns
            .iter()
            .map(|p| types.iter().map(|t| matches(p, t)).collect())
            .collect();
        for (i, a) in patterns.iter().enumerate() {
            for (j, b) in patterns.iter().enumerate() {
                let brute = (0..types.len()).any(|k| matched[i][k] && matched[j][k]);
                match overlap_example(a, b) {
                    Some(ex) => {
                        assert!(brute, "{a} / {b}: claimed {ex}, brute force found none");
                        assert!(matches(a, &ex) && matches(b, &ex), "{a} / {b}: {ex}");
                        assert!(is_valid_task_type(&ex));
                    }
                    None => assert!(!brute, "{a} / {b}: overlap missed"),
                }
            }
        }
    }
}
