//! Label selectors with Kubernetes semantics.
//!
//! A [`LabelSelector`] is a validated conjunction of [`Requirement`]s. It is built either from the
//! structured form (`matchLabels` + `matchExpressions`, as in vcluster.yaml and `metav1.LabelSelector`)
//! via [`LabelSelector::from_parts`], or from the string form an API server receives
//! (`environment=dev,kubernetes.io/runtime.class in (gvisor,youki),!legacy`) via
//! [`LabelSelector::parse`]. Both reject what kube-apiserver rejects, so an invalid selector can not
//! exist: matching never fails.
//!
//! Semantics as upstream: all requirements are ANDed; an empty selector selects everything;
//! `NotIn` and `!=` also match objects that do not carry the key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::labels::{validate_label_key, validate_label_value};

/// One condition on a label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Operator {
    /// The label exists and its value is in the set (`matchLabels`, `=`, `==`, `in`).
    In(BTreeSet<String>),
    /// The label is absent, or its value is not in the set (`!=`, `notin`).
    NotIn(BTreeSet<String>),
    /// The label exists, whatever its value.
    Exists,
    /// The label does not exist.
    DoesNotExist,
    /// The label exists and its value, as an integer, is greater than this.
    GreaterThan(i64),
    /// The label exists and its value, as an integer, is less than this.
    LessThan(i64),
}

/// A key and an operator: one term of a selector.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Requirement {
    key: String,
    operator: Operator,
}

impl Requirement {
    /// Builds a requirement, validating the key and the values as kube-apiserver does.
    pub fn new(key: &str, operator: Operator) -> Result<Self, String> {
        validate_label_key(key)?;
        match &operator {
            Operator::In(values) | Operator::NotIn(values) => {
                if values.is_empty() {
                    return Err(
                        "values: Required value: must be specified when `operator` is 'In' or 'NotIn'".into(),
                    );
                }
                for value in values {
                    validate_label_value(value)?;
                }
            }
            Operator::Exists | Operator::DoesNotExist => {}
            Operator::GreaterThan(_) | Operator::LessThan(_) => {}
        }
        Ok(Self {
            key: key.to_string(),
            operator,
        })
    }

    /// The label key this requirement is about.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operator and its values.
    pub fn operator(&self) -> &Operator {
        &self.operator
    }

    /// Whether a label set satisfies this requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
            Operator::GreaterThan(n) => value.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > *n),
            Operator::LessThan(n) => value.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < *n),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |values: &BTreeSet<String>| values.iter().cloned().collect::<Vec<_>>().join(",");
        match &self.operator {
            Operator::In(values) if values.len() == 1 => write!(f, "{}={}", self.key, join(values)),
            Operator::In(values) => write!(f, "{} in ({})", self.key, join(values)),
            Operator::NotIn(values) if values.len() == 1 => {
                write!(f, "{}!={}", self.key, join(values))
            }
            Operator::NotIn(values) => write!(f, "{} notin ({})", self.key, join(values)),
            Operator::Exists => write!(f, "{}", self.key),
            Operator::DoesNotExist => write!(f, "!{}", self.key),
            Operator::GreaterThan(n) => write!(f, "{}>{n}", self.key),
            Operator::LessThan(n) => write!(f, "{}<{n}", self.key),
        }
    }
}

/// A validated label selector: requirements that must all hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    requirements: Vec<Requirement>,
}

/// One entry of `matchExpressions`, as written in a config file or a `metav1.LabelSelector`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchExpression {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist` (case-sensitive, as upstream).
    pub operator: String,
    /// Values for `In`/`NotIn`; must be empty for `Exists`/`DoesNotExist`.
    pub values: Vec<String>,
}

impl MatchExpression {
    /// Converts to a requirement with `metav1.LabelSelector` rules. Errors carry the field they are
    /// about (`key`, `operator` or `values`) as their first element.
    pub fn to_requirement(&self) -> Result<Requirement, (&'static str, String)> {
        let set = || self.values.iter().cloned().collect::<BTreeSet<_>>();
        let operator = match self.operator.as_str() {
            "In" | "NotIn" if self.values.is_empty() => {
                return Err((
                    "values",
                    format!("must be specified when operator is {:?}", self.operator),
                ));
            }
            "In" => Operator::In(set()),
            "NotIn" => Operator::NotIn(set()),
            "Exists" | "DoesNotExist" if !self.values.is_empty() => {
                return Err((
                    "values",
                    format!("may not be specified when operator is {:?}", self.operator),
                ));
            }
            "Exists" => Operator::Exists,
            "DoesNotExist" => Operator::DoesNotExist,
            other => {
                return Err((
                    "operator",
                    format!(
                        "unknown operator {other:?}: must be one of \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""
                    ),
                ));
            }
        };
        validate_label_key(&self.key).map_err(|e| ("key", e))?;
        for value in &self.values {
            validate_label_value(value).map_err(|e| ("values", e))?;
        }
        Ok(Requirement {
            key: self.key.clone(),
            operator,
        })
    }
}

impl LabelSelector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from validated requirements.
    pub fn from_requirements(requirements: Vec<Requirement>) -> Self {
        Self { requirements }
    }

    /// Builds a selector from the structured form. `matchLabels` entries become `In` requirements.
    /// Errors name the offending entry: `matchLabels.<key>` or `matchExpressions[<i>].<field>`.
    pub fn from_parts(
        match_labels: &BTreeMap<String, String>,
        match_expressions: &[MatchExpression],
    ) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        let mut requirements = Vec::new();
        for (key, value) in match_labels {
            let req = validate_label_key(key)
                .and_then(|()| validate_label_value(value))
                .map(|()| Requirement {
                    key: key.clone(),
                    operator: Operator::In(BTreeSet::from([value.clone()])),
                });
            match req {
                Ok(req) => requirements.push(req),
                Err(e) => errors.push((format!("matchLabels.{key}"), e)),
            }
        }
        for (i, expr) in match_expressions.iter().enumerate() {
            match expr.to_requirement() {
                Ok(req) => requirements.push(req),
                Err((field, e)) => errors.push((format!("matchExpressions[{i}].{field}"), e)),
            }
        }
        if errors.is_empty() {
            Ok(Self { requirements })
        } else {
            Err(errors)
        }
    }

    /// Parses the string form an API server accepts in `?labelSelector=`.
    ///
    /// Grammar (as `k8s.io/apimachinery/pkg/labels.Parse`): comma-separated requirements, each one of
    /// `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1,v2)`, `key notin (v1,v2)`,
    /// `key>n`, `key<n`; whitespace between tokens is ignored.
    pub fn parse(input: &str) -> Result<Self, String> {
        SelectorParser::new(input).parse()
    }

    /// Whether the selector has no requirements (selects everything).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// The requirements, in the order given.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether a label set satisfies every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl fmt::Display for LabelSelector {
    /// The string form, parseable by [`LabelSelector::parse`] and by kube-apiserver.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Not,
    Eq,
    DoubleEq,
    NotEq,
    Gt,
    Lt,
    Comma,
    Open,
    Close,
}

struct SelectorParser<'a> {
    input: &'a str,
    tokens: Vec<Token>,
    pos: usize,
}

impl<'a> SelectorParser<'a> {
    fn new(input: &'a str) -> Self {
        Self {
            input,
            tokens: Vec::new(),
            pos: 0,
        }
    }

    fn lex(&mut self) -> Result<(), String> {
        let mut chars = self.input.chars().peekable();
        while let Some(&c) = chars.peek() {
            match c {
                c if c.is_whitespace() => {
                    chars.next();
                }
                '!' => {
                    chars.next();
                    if chars.peek() == Some(&'=') {
                        chars.next();
                        self.tokens.push(Token::NotEq);
                    } else {
                        self.tokens.push(Token::Not);
                    }
                }
                '=' => {
                    chars.next();
                    if chars.peek() == Some(&'=') {
                        chars.next();
                        self.tokens.push(Token::DoubleEq);
                    } else {
                        self.tokens.push(Token::Eq);
                    }
                }
                '>' => {
                    chars.next();
                    self.tokens.push(Token::Gt);
                }
                '<' => {
                    chars.next();
                    self.tokens.push(Token::Lt);
                }
                ',' => {
                    chars.next();
                    self.tokens.push(Token::Comma);
                }
                '(' => {
                    chars.next();
                    self.tokens.push(Token::Open);
                }
                ')' => {
                    chars.next();
                    self.tokens.push(Token::Close);
                }
                _ => {
                    let mut ident = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || "!=<>,()".contains(c) {
                            break;
                        }
                        ident.push(c);
                        chars.next();
                    }
                    self.tokens.push(Token::Ident(ident));
                }
            }
        }
        Ok(())
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn err(&self, what: &str) -> String {
        format!(
            "unable to parse requirement: found {what} in label selector {:?}",
            self.input
        )
    }

    fn parse(mut self) -> Result<LabelSelector, String> {
        self.lex()?;
        let mut requirements = Vec::new();
        if self.tokens.is_empty() {
            return Ok(LabelSelector::default());
        }
        loop {
            requirements.push(self.requirement()?);
            match self.next() {
                None => break,
                Some(Token::Comma) => {
                    if self.peek().is_none() {
                        return Err(self.err("trailing ','"));
                    }
                }
                Some(t) => return Err(self.err(&format!("unexpected {t:?}, expected ','"))),
            }
        }
        Ok(LabelSelector { requirements })
    }

    fn ident(&mut self, what: &str) -> Result<String, String> {
        match self.next() {
            Some(Token::Ident(s)) => Ok(s),
            Some(t) => Err(self.err(&format!("{t:?}, expected {what}"))),
            None => Err(self.err(&format!("end of input, expected {what}"))),
        }
    }

    fn requirement(&mut self) -> Result<Requirement, String> {
        if self.peek() == Some(&Token::Not) {
            self.next();
            let key = self.ident("a key after '!'")?;
            return Requirement::new(&key, Operator::DoesNotExist);
        }
        let key = self.ident("a key")?;
        let operator = match self.peek() {
            None | Some(Token::Comma) => Operator::Exists,
            Some(Token::Eq) | Some(Token::DoubleEq) => {
                self.next();
                Operator::In(BTreeSet::from([self.value()?]))
            }
            Some(Token::NotEq) => {
                self.next();
                Operator::NotIn(BTreeSet::from([self.value()?]))
            }
            Some(Token::Gt) | Some(Token::Lt) => {
                let gt = self.next() == Some(Token::Gt);
                let raw = self.ident("an integer")?;
                let n = raw
                    .parse::<i64>()
                    .map_err(|_| self.err(&format!("{raw:?}, expected an integer")))?;
                if gt {
                    Operator::GreaterThan(n)
                } else {
                    Operator::LessThan(n)
                }
            }
            Some(Token::Ident(word)) if word == "in" || word == "notin" => {
                let is_in = word == "in";
                self.next();
                let values = self.value_set()?;
                if is_in {
                    Operator::In(values)
                } else {
                    Operator::NotIn(values)
                }
            }
            Some(t) => return Err(self.err(&format!("{t:?}, expected an operator"))),
        };
        Requirement::new(&key, operator)
    }

    /// A value after `=`, `==` or `!=`: possibly empty (`a=` selects an empty value).
    fn value(&mut self) -> Result<String, String> {
        match self.peek() {
            None | Some(Token::Comma) => Ok(String::new()),
            _ => self.ident("a value"),
        }
    }

    fn value_set(&mut self) -> Result<BTreeSet<String>, String> {
        if self.next() != Some(Token::Open) {
            return Err(self.err("no '(' after 'in'/'notin'"));
        }
        let mut values = BTreeSet::new();
        loop {
            match self.next() {
                Some(Token::Ident(v)) => {
                    values.insert(v);
                    match self.next() {
                        Some(Token::Comma) => continue,
                        Some(Token::Close) => break,
                        _ => return Err(self.err("an unterminated value set, expected ',' or ')'")),
                    }
                }
                Some(Token::Close) => break,
                Some(Token::Comma) => {
                    values.insert(String::new());
                }
                _ => return Err(self.err("an unterminated value set")),
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> MatchExpression {
        MatchExpression {
            key: key.into(),
            operator: op.into(),
            values: values.iter().map(|s| s.to_string()).collect(),
        }
    }

    const RC: &str = "kubernetes.io/runtime.class";

    /// Every selector example of the spec, against the classes of its use cases.
    #[test]
    fn spec_examples() {
        let gvisor_dev = labels(&[("environment", "development"), (RC, "gvisor")]);
        let youki_dev = labels(&[("environment", "development"), (RC, "youki")]);
        let kata_dev = labels(&[("environment", "development"), (RC, "kata")]);
        let gvisor_prod = labels(&[("environment", "production"), (RC, "gvisor")]);
        let unlabelled = labels(&[]);

        let none = LabelSelector::everything();
        let match_labels =
            LabelSelector::from_parts(&labels(&[("environment", "development")]), &[]).unwrap();
        let match_expressions =
            LabelSelector::from_parts(&BTreeMap::new(), &[expr(RC, "In", &["gvisor", "youki"])]).unwrap();
        let combined = LabelSelector::from_parts(
            &labels(&[("environment", "development")]),
            &[expr(RC, "In", &["gvisor", "youki"])],
        )
        .unwrap();

        let table: &[(&LabelSelector, &BTreeMap<String, String>, bool)] = &[
            (&none, &gvisor_dev, true),
            (&none, &unlabelled, true),
            (&match_labels, &gvisor_dev, true),
            (&match_labels, &kata_dev, true),
            (&match_labels, &gvisor_prod, false),
            (&match_labels, &unlabelled, false),
            (&match_expressions, &gvisor_dev, true),
            (&match_expressions, &youki_dev, true),
            (&match_expressions, &gvisor_prod, true),
            (&match_expressions, &kata_dev, false),
            (&match_expressions, &unlabelled, false),
            (&combined, &gvisor_dev, true),
            (&combined, &youki_dev, true),
            (&combined, &kata_dev, false),
            (&combined, &gvisor_prod, false),
        ];
        for (i, (selector, labels, want)) in table.iter().enumerate() {
            assert_eq!(
                selector.matches(labels),
                *want,
                "row {i}: {selector} on {labels:?}"
            );
        }
    }

    #[test]
    fn operators() {
        let cases = [
            (expr("env", "NotIn", &["prod"]), labels(&[("env", "dev")]), true),
            (expr("env", "NotIn", &["prod"]), labels(&[]), true),
            (expr("env", "NotIn", &["prod"]), labels(&[("env", "prod")]), false),
            (expr("env", "Exists", &[]), labels(&[("env", "")]), true),
            (expr("env", "Exists", &[]), labels(&[]), false),
            (expr("env", "DoesNotExist", &[]), labels(&[]), true),
            (expr("env", "DoesNotExist", &[]), labels(&[("env", "x")]), false),
        ];
        for (e, l, want) in cases {
            let s = LabelSelector::from_parts(&BTreeMap::new(), std::slice::from_ref(&e)).unwrap();
            assert_eq!(s.matches(&l), want, "{e:?} on {l:?}");
        }
    }

    #[test]
    fn invalid_expressions_name_the_field() {
        let cases = [
            (expr("env", "in", &["a"]), "matchExpressions[0].operator"),
            (expr("env", "In", &[]), "matchExpressions[0].values"),
            (expr("env", "Exists", &["a"]), "matchExpressions[0].values"),
            (expr("-bad", "Exists", &[]), "matchExpressions[0].key"),
            (expr("env", "In", &["bad value"]), "matchExpressions[0].values"),
        ];
        for (e, path) in cases {
            let errs = LabelSelector::from_parts(&BTreeMap::new(), std::slice::from_ref(&e)).unwrap_err();
            assert_eq!(errs[0].0, path, "{e:?}: {errs:?}");
        }
        let errs = LabelSelector::from_parts(&labels(&[("bad key!", "v")]), &[]).unwrap_err();
        assert_eq!(errs[0].0, "matchLabels.bad key!");
    }

    #[test]
    fn parse_string_form() {
        let s =
            LabelSelector::parse("env=dev, kubernetes.io/runtime.class in (gvisor,youki),!legacy").unwrap();
        assert!(s.matches(&labels(&[("env", "dev"), (RC, "youki")])));
        assert!(!s.matches(&labels(&[("env", "dev"), (RC, "kata")])));
        assert!(!s.matches(&labels(&[("env", "dev"), (RC, "gvisor"), ("legacy", "1")])));

        let s = LabelSelector::parse("a==1,b!=2,c notin (x, y),d,e>3,f<10").unwrap();
        assert!(s.matches(&labels(&[
            ("a", "1"),
            ("c", "z"),
            ("d", ""),
            ("e", "4"),
            ("f", "9")
        ])));
        assert!(!s.matches(&labels(&[
            ("a", "1"),
            ("b", "2"),
            ("d", ""),
            ("e", "4"),
            ("f", "9")
        ])));
        assert_eq!(LabelSelector::parse("").unwrap(), LabelSelector::everything());
        assert_eq!(LabelSelector::parse("  ").unwrap(), LabelSelector::everything());

        for bad in [
            "a in ()", "a in (b", "a=b,", ",a", "a b", "a in b", "-a=b", "a>x", "!", "a=(b)",
        ] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "a=b",
            "a in (b,c)",
            "a notin (b,c)",
            "a!=b",
            "a",
            "!a",
            "a>1",
            "a<2",
            "a=b,c in (d,e),!f",
        ] {
            let parsed = LabelSelector::parse(s).unwrap();
            assert_eq!(parsed.to_string(), s);
            assert_eq!(LabelSelector::parse(&parsed.to_string()).unwrap(), parsed);
        }
    }
}
