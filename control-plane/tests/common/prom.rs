//! A parser of the Prometheus text exposition format (version 0.0.4) that rejects what
//! Prometheus would reject, plus the naming conventions an operator relies on: counters end in
//! `_total`, histograms have cumulative `le` buckets ending at `+Inf` equal to `_count`, and
//! durations are in `_seconds`.

use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default, Clone)]
pub struct Family {
    pub name: String,
    pub kind: String,
    pub help: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default)]
pub struct Exposition {
    pub families: Vec<Family>,
}

impl Exposition {
    pub fn family(&self, name: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.name == name)
    }

    /// The sum of every sample named `name` whose labels include `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.families
            .iter()
            .flat_map(|f| &f.samples)
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }
}

fn valid_metric_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}")),
    }
}

/// `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("sample without a value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let mut end = None;
        loop {
            // Skip separators.
            while let Some((_, c)) = chars.peek() {
                if *c == ',' || *c == ' ' {
                    chars.next();
                } else {
                    break;
                }
            }
            match chars.peek() {
                Some((i, '}')) => {
                    end = Some(*i);
                    break;
                }
                None => break,
                _ => {}
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if !valid_label_name(&key) {
                return Err(format!("bad label name {key:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {key} value is not quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => return Err(format!("bad escape {other:?} in label {key}")),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("label {key} value is not closed"));
            }
            if labels.insert(key.clone(), value).is_some() {
                return Err(format!("label {key} repeated"));
            }
        }
        let end = end.ok_or("label set is not closed")?;
        rest = &after[end + 1..];
    }
    let mut fields = rest.split_whitespace();
    let value = parse_value(fields.next().ok_or("sample without a value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The family a sample belongs to: histogram samples carry `_bucket`, `_sum`, `_count`.
fn family_of<'a>(sample: &'a str, families: &HashMap<String, usize>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix)
            && families.contains_key(base)
        {
            return base;
        }
    }
    sample
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut out = Exposition::default();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut closed: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut parts = comment.trim_start().splitn(3, ' ');
            let keyword = parts.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let name = parts.next().ok_or_else(|| at("no metric name".into()))?;
            let arg = parts.next().unwrap_or("").to_owned();
            if !valid_metric_name(name) {
                return Err(at(format!("bad metric name {name:?}")));
            }
            if closed.iter().any(|c| c == name) {
                return Err(at(format!("{name} appears in two places")));
            }
            let i = *index.entry(name.to_owned()).or_insert_with(|| {
                out.families.push(Family {
                    name: name.to_owned(),
                    ..Family::default()
                });
                out.families.len() - 1
            });
            let f = &mut out.families[i];
            if keyword == "TYPE" {
                if !f.kind.is_empty() {
                    return Err(at(format!("second TYPE for {name}")));
                }
                if !f.samples.is_empty() {
                    return Err(at(format!("TYPE after samples of {name}")));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&arg.as_str())
                {
                    return Err(at(format!("unknown type {arg:?}")));
                }
                f.kind = arg;
            } else {
                f.help = arg;
            }
            if current.as_deref() != Some(name)
                && let Some(prev) = current.replace(name.to_owned())
            {
                closed.push(prev);
            }
            continue;
        }
        let sample = parse_sample(line).map_err(at)?;
        let base = family_of(&sample.name, &index).to_owned();
        if closed.contains(&base) {
            return Err(at(format!("{base} appears in two places")));
        }
        if current.as_deref() != Some(base.as_str())
            && let Some(prev) = current.replace(base.clone())
        {
            closed.push(prev);
        }
        let i = *index.entry(base.clone()).or_insert_with(|| {
            out.families.push(Family {
                name: base.clone(),
                kind: "untyped".into(),
                ..Family::default()
            });
            out.families.len() - 1
        });
        let f = &mut out.families[i];
        if f.samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(at("duplicate series".into()));
        }
        f.samples.push(sample);
    }
    for f in &out.families {
        check_conventions(f)?;
    }
    Ok(out)
}

fn check_conventions(f: &Family) -> Result<(), String> {
    let name = &f.name;
    match f.kind.as_str() {
        "counter" if !name.ends_with("_total") => {
            return Err(format!("counter {name} does not end in _total"));
        }
        "histogram" => check_histogram(f)?,
        _ => {}
    }
    if (name.contains("duration") || name.contains("latency")) && !name.contains("_seconds") {
        return Err(format!("{name}: durations are measured in seconds"));
    }
    for s in &f.samples {
        for bad in ["client", "ip", "api_key", "key", "user"] {
            if s.labels.contains_key(bad) {
                return Err(format!("{name}: label {bad} has unbounded cardinality"));
            }
        }
    }
    Ok(())
}

fn check_histogram(f: &Family) -> Result<(), String> {
    let name = &f.name;
    // Group buckets by their labels other than `le`.
    let mut series: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts: BTreeMap<BTreeMap<String, String>, f64> = BTreeMap::new();
    for s in &f.samples {
        if s.name == format!("{name}_bucket") {
            let mut labels = s.labels.clone();
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{name}_bucket without le"))?;
            series
                .entry(labels)
                .or_default()
                .push((parse_value(&le)?, s.value));
        } else if s.name == format!("{name}_count") {
            counts.insert(s.labels.clone(), s.value);
        } else if s.name != format!("{name}_sum") {
            return Err(format!("{name}: unexpected sample {}", s.name));
        }
    }
    for (labels, buckets) in &series {
        let mut prev = (f64::NEG_INFINITY, 0.0);
        for &(le, count) in buckets {
            if le <= prev.0 || count < prev.1 {
                return Err(format!("{name}{labels:?}: buckets are not cumulative"));
            }
            prev = (le, count);
        }
        if prev.0 != f64::INFINITY {
            return Err(format!("{name}{labels:?}: no +Inf bucket"));
        }
        if counts.get(labels) != Some(&prev.1) {
            return Err(format!("{name}{labels:?}: +Inf bucket differs from _count"));
        }
    }
    Ok(())
}

#[test]
fn the_parser_refuses_what_prometheus_refuses() {
    let ok = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\\\"q\"} 3\n";
    assert_eq!(parse(ok).unwrap().sum("a_total", &[("x", "1\"q")]), 3.0);
    for bad in [
        "# TYPE a counter\na 1\n",
        "a{x=1} 2\n",
        "a{x=\"1\"} two\n",
        "# TYPE h_seconds histogram\nh_seconds_bucket{le=\"1\"} 2\nh_seconds_bucket{le=\"+Inf\"} 1\nh_seconds_count 1\n",
        "a 1\nb 1\na 2\n",
        "# TYPE r_duration gauge\nr_duration 1\n",
    ] {
        assert!(parse(bad).is_err(), "accepted {bad:?}");
    }
}
