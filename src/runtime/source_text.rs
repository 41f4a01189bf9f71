//! Reading source text: comments blanked out and top-level splits. build.rs reads the kernels' signatures from
//! cuda/*.cu with it; a test of runtime/cuda.rs reads every launch site of src/ with it.

/// Text with `//` and `/* */` comments blanked out, line breaks kept (string literals kept, so "a//b"
/// survives).
pub(crate) fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let (mut in_str, mut chars) = (false, src.chars().peekable());
    while let Some(c) = chars.next() {
        if in_str {
            out.push(c);
            if c == '\\' {
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            } else if c == '"' {
                in_str = false;
            }
        } else if c == '"' {
            in_str = true;
            out.push(c);
        } else if c == '/' && chars.peek() == Some(&'/') {
            for n in chars.by_ref() {
                if n == '\n' {
                    out.push('\n');
                    break;
                }
            }
        } else if c == '/' && chars.peek() == Some(&'*') {
            chars.next();
            let mut prev = ' ';
            for n in chars.by_ref() {
                if prev == '*' && n == '/' {
                    break;
                }
                if n == '\n' {
                    out.push('\n');
                }
                prev = n;
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` split at the commas that are outside any (), [], {} and string literal.
pub(crate) fn split_top(s: &str) -> Vec<String> {
    let (mut parts, mut cur, mut depth, mut in_str) = (Vec::new(), String::new(), 0i32, false);
    for c in s.chars() {
        match c {
            '"' => in_str = !in_str,
            '(' | '[' | '{' if !in_str => depth += 1,
            ')' | ']' | '}' if !in_str => depth -= 1,
            ',' if !in_str && depth == 0 => {
                parts.push(std::mem::take(&mut cur).trim().to_string());
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.trim().is_empty() {
        parts.push(cur.trim().to_string());
    }
    parts
}

/// The text between the parenthesis at `open` and its match.
pub(crate) fn inside_parens(s: &str, open: usize) -> &str {
    let (mut depth, mut in_str) = (0, false);
    for (i, c) in s[open..].char_indices() {
        match c {
            '"' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return &s[open + 1..open + i];
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced parentheses after byte {open}")
}
