//! Rendering an error for people: the message and each cause once.

/// An error and its causes in one line: what operators and peers read.
/// Ferry's error messages never repeat their source, so this only joins.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
