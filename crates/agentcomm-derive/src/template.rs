//! Channel templates, checked at compile time.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    Class,
    Direction,
    Session,
}

/// Parses `payments.{direction}.{session_id}` into parts, or says what is wrong and how to fix it.
pub fn parse(template: &str) -> Result<Vec<Part>, String> {
    const PLACEHOLDERS: &str = "`{class}`, `{direction}` and `{session_id}`";
    let mut parts = Vec::new();
    let mut rest = template;
    let mut literal = String::new();
    while let Some(c) = rest.chars().next() {
        match c {
            '{' => {
                let Some(end) = rest.find('}') else {
                    return Err(format!(
                        "`{{` without a closing `}}` in channel template \"{template}\""
                    ));
                };
                let name = &rest[1..end];
                let part = match name {
                    "class" => Part::Class,
                    "direction" => Part::Direction,
                    "session_id" => Part::Session,
                    "session" => {
                        return Err(format!(
                            "unknown placeholder `{{session}}` in channel template \"{template}\": write `{{session_id}}`"
                        ));
                    }
                    other => {
                        return Err(format!(
                            "unknown placeholder `{{{other}}}` in channel template \"{template}\": the placeholders are {PLACEHOLDERS}"
                        ));
                    }
                };
                if parts.contains(&part) {
                    return Err(format!(
                        "placeholder `{{{name}}}` appears twice in channel template \"{template}\""
                    ));
                }
                if literal.is_empty()
                    && parts.last().is_some_and(|p| !matches!(p, Part::Literal(_)))
                {
                    return Err(format!(
                        "placeholders must be separated by literal text in channel template \"{template}\", \
                         or a channel name could not be split back into its components (write e.g. `{{class}}.{{session_id}}`)"
                    ));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(part);
                rest = &rest[end + 1..];
            }
            '}' => {
                return Err(format!(
                    "`}}` without an opening `{{` in channel template \"{template}\""
                ));
            }
            '*' => {
                return Err(format!(
                    "`*` in channel template \"{template}\": it is the pattern wildcard and cannot be literal text"
                ));
            }
            c if c.is_whitespace() || c.is_control() => {
                return Err(format!(
                    "whitespace in channel template \"{template}\": channel names cannot contain it"
                ));
            }
            c => {
                literal.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    if !parts.contains(&Part::Session) {
        return Err(format!(
            "channel template \"{template}\" has no `{{session_id}}` placeholder: every session would share one channel; add `{{session_id}}`"
        ));
    }
    Ok(parts)
}

/// The character a component may not contain under a template: the first character of the literal
/// text after its placeholder (the runtime splits a channel name back at it), as in
/// `agentcomm_core::channel::ChannelTemplate::separator_after`. `None` when the placeholder is last,
/// absent, or followed by `:` (which no component contains anyway).
pub fn separator_after(parts: &[Part], placeholder: &Part) -> Option<char> {
    let index = parts.iter().position(|part| part == placeholder)?;
    match parts.get(index + 1) {
        Some(Part::Literal(text)) => text.chars().next().filter(|c| *c != ':'),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_form() {
        assert_eq!(
            parse("payments.{direction}.{session_id}").unwrap(),
            vec![
                Part::Literal("payments.".into()),
                Part::Direction,
                Part::Literal(".".into()),
                Part::Session
            ]
        );
        assert_eq!(parse("{class}:{direction}:{session_id}").unwrap().len(), 5);
    }

    #[test]
    fn a_components_separator_is_the_literal_after_it() {
        let parts = parse("{class}.{direction}-x:{session_id}").unwrap();
        assert_eq!(separator_after(&parts, &Part::Class), Some('.'));
        assert_eq!(separator_after(&parts, &Part::Direction), Some('-'));
        assert_eq!(separator_after(&parts, &Part::Session), None);
        let parts = parse("{class}:{direction}:{session_id}").unwrap();
        assert_eq!(separator_after(&parts, &Part::Class), None);
        let parts = parse("payments.{session_id}").unwrap();
        assert_eq!(separator_after(&parts, &Part::Direction), None);
    }

    #[test]
    fn refuses_what_would_break_routing() {
        let cases = [
            (
                "payments.{direction}.{user}",
                "unknown placeholder `{user}`",
            ),
            ("payments.{direction}", "no `{session_id}` placeholder"),
            ("payments.{session}", "write `{session_id}`"),
            ("{class}{session_id}", "separated by literal text"),
            ("{session_id}.{session_id}", "appears twice"),
            ("a.{session_id", "without a closing"),
            ("a}.{session_id}", "without an opening"),
            ("a.*.{session_id}", "wildcard"),
            ("a b.{session_id}", "whitespace"),
        ];
        for (template, expected) in cases {
            let error = parse(template).unwrap_err();
            assert!(error.contains(expected), "{template}: {error}");
        }
    }
}
