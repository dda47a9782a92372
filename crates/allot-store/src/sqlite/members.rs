//! Replacing top-level string members of a stored JSON document in place, for the expiry
//! release (a booking's `status` and `updated_at`): one scan for the members' value spans, no
//! tree built. SQLite's `json_set` converts the whole document to its binary form and prints
//! it back, which was ~40 % of a release's writer time in a storm of lapsed holds.
//!
//! The scanner walks documents serde wrote; it is not a validator. It finds where each
//! top-level member's value starts and ends (strings with their escapes, nested objects and
//! arrays by depth, literals up to the next delimiter) and refuses what it cannot walk.

use std::ops::Range;

use rusqlite::functions::{Context, FunctionFlags};
use rusqlite::{Connection, Error, Result};

/// The SQL function: `json_set_strings(doc, name, value, …)`, `doc` with the value of each
/// named top-level member replaced by the JSON string `value`; an error if a member is absent,
/// repeated, or the document cannot be walked.
pub(crate) const FUNCTION: &str = "json_set_strings";
/// Members one call may replace.
const MEMBERS_MAX: usize = 8;

/// Registers [`FUNCTION`] on `conn`.
pub(crate) fn register(conn: &Connection) -> Result<()> {
    let flags = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC | FunctionFlags::SQLITE_DIRECTONLY;
    conn.create_scalar_function(FUNCTION, -1, flags, call)
}

fn call(ctx: &Context<'_>) -> Result<String> {
    let fail = |message: &str| Error::UserFunctionError(format!("{FUNCTION}: {message}").into());
    let args = ctx.len();
    if args < 3 || args.is_multiple_of(2) || (args - 1) / 2 > MEMBERS_MAX {
        return Err(fail("a document and up to 8 name/value pairs"));
    }
    let doc = ctx.get_raw(0).as_str().map_err(|_| fail("the document is not text"))?;
    let mut values = Vec::with_capacity((args - 1) / 2);
    for pair in (1..args).step_by(2) {
        let name = ctx.get_raw(pair).as_str().map_err(|_| fail("a member name is not text"))?;
        let value = ctx.get_raw(pair + 1).as_str().map_err(|_| fail("a value is not text"))?;
        values.push((name, serde_json::to_string(value).map_err(|e| fail(&e.to_string()))?));
    }
    set_members(doc, &values).ok_or_else(|| fail("a member is absent or repeated, or the document is not an object"))
}

/// `doc` with the value of each top-level member named in `values` replaced by the JSON text
/// given; `None` if one is absent or repeated, or `doc` is not an object the scanner can walk.
pub(crate) fn set_members(doc: &str, values: &[(&str, String)]) -> Option<String> {
    let mut found: Vec<(Range<usize>, &str)> = Vec::with_capacity(values.len());
    for (key, value) in members(doc)? {
        if let Some((_, text)) = values.iter().find(|(name, _)| *name == &doc[key.clone()]) {
            found.push((value, text));
        }
    }
    let each_once = found.len() == values.len()
        && values.iter().all(|(name, _)| values.iter().filter(|(other, _)| other == name).count() == 1);
    if !each_once {
        return None;
    }
    found.sort_by_key(|(span, _)| span.start);
    let mut out = String::with_capacity(doc.len() + 32);
    let mut copied = 0;
    for (span, text) in found {
        out.push_str(&doc[copied..span.start]);
        out.push_str(text);
        copied = span.end;
    }
    out.push_str(&doc[copied..]);
    Some(out)
}

/// The top-level members of the object `doc`: each key's text (between its quotes) and its
/// value's span.
fn members(doc: &str) -> Option<Vec<(Range<usize>, Range<usize>)>> {
    let mut scan = Scan { bytes: doc.as_bytes(), at: 0 };
    let mut members = Vec::new();
    scan.space();
    scan.eat(b'{')?;
    scan.space();
    if scan.eat(b'}').is_none() {
        loop {
            scan.space();
            let key_start = scan.at + 1;
            scan.string()?;
            let key = key_start..scan.at - 1;
            scan.space();
            scan.eat(b':')?;
            scan.space();
            let value_start = scan.at;
            scan.value()?;
            members.push((key, value_start..scan.at));
            scan.space();
            if scan.eat(b',').is_none() {
                scan.eat(b'}')?;
                break;
            }
        }
    }
    scan.space();
    (scan.at == doc.len()).then_some(members)
}

struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// A string, quotes included; an escape skips the byte after the backslash (`\uXXXX`'s
    /// digits are plain bytes).
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => self.at += 2,
                _ => self.at += 1,
            }
        }
    }

    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string(),
            b'{' | b'[' => self.nested(),
            _ => {
                let start = self.at;
                while self.peek().is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\n' | b'\r' | b'\t')) {
                    self.at += 1;
                }
                (self.at > start).then_some(())
            }
        }
    }

    /// An object or array, up to the bracket that closes it (strings skipped whole).
    fn nested(&mut self) -> Option<()> {
        let mut depth = 0_usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.at += 1;
                        return Some(());
                    }
                }
                _ => {}
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    use super::*;

    /// JSON values of any shape, with strings full of quotes, backslashes, brackets and
    /// non-ASCII text, and keys that repeat the names being replaced at every depth.
    fn json() -> impl Strategy<Value = Value> {
        let text = "[\\\\\"{}\\[\\],:a-z é\u{1F600}\n]{0,12}";
        let key = prop_oneof![Just("status".to_owned()), Just("updated_at".to_owned()), "[a-z\"\\\\]{1,6}"];
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            text.prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key.clone(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    proptest! {
        /// Whatever surrounds them, the replaced document is what serde writes of the object
        /// with those two members changed.
        #[test]
        fn the_result_is_serdes_document_with_the_members_changed(
            rest in prop::collection::btree_map("[a-z_]{1,10}", json(), 0..8),
            status in json(),
            updated_at in json(),
            new_status in "[a-z\"\\\\é]{0,10}",
        ) {
            let mut object: Map<String, Value> = rest.into_iter().collect();
            object.insert("status".into(), status);
            object.insert("updated_at".into(), updated_at);
            let doc = serde_json::to_string(&object).unwrap();
            let mut want = object.clone();
            want.insert("status".into(), Value::String(new_status.clone()));
            want.insert("updated_at".into(), Value::String("T".into()));
            let values = [
                ("status", serde_json::to_string(&new_status).unwrap()),
                ("updated_at", "\"T\"".to_owned()),
            ];
            prop_assert_eq!(set_members(&doc, &values), Some(serde_json::to_string(&want).unwrap()));
        }
    }

    fn set(doc: &str) -> Option<String> {
        let values = [("status", "\"expired\"".to_owned()), ("updated_at", "\"T\"".to_owned())];
        set_members(doc, &values)
    }

    #[test]
    fn only_top_level_members_change_whatever_the_nested_ones_are_called() {
        let doc = r#"{"id":"a","status":"held","payment":{"status":"held","n":[1,{"status":2}]},"note":"\"status\":\"held\" \\","updated_at":"x","z":null}"#;
        let want = r#"{"id":"a","status":"expired","payment":{"status":"held","n":[1,{"status":2}]},"note":"\"status\":\"held\" \\","updated_at":"T","z":null}"#;
        assert_eq!(set(doc).as_deref(), Some(want));
        let spaced = "{ \"status\" : \"held\" ,\n\"updated_at\":\t\"x\" }";
        assert_eq!(set(spaced).as_deref(), Some("{ \"status\" : \"expired\" ,\n\"updated_at\":\t\"T\" }"));
    }

    #[test]
    fn a_member_absent_or_repeated_or_a_document_it_cannot_walk_is_refused() {
        for doc in [
            r#"{"status":"held"}"#,
            r#"{"status":"held","updated_at":"x","status":"y"}"#,
            r#"{"payment":{"status":"held","updated_at":"x"}}"#,
            r#"{"status":"held","updated_at":"x""#,
            r#"{"status":"held","updated_at":"x"} trailing"#,
            r#"{"status":"he"#,
            r#"{"status":,"updated_at":"x"}"#,
            r#"{"status":["held"}],"updated_at":"x"}"#,
            r#"["status","held"]"#,
            "",
        ] {
            assert_eq!(set(doc), None, "{doc}");
        }
    }
}
