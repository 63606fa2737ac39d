//! The README as a newcomer follows it: short enough, every shell variable set before a command
//! uses it, the admin token chosen before the stack starts, a key created over REST and sent with
//! `X-API-Key`, and the cache key's `Host` explained.

use std::collections::BTreeSet;

fn readme() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    std::fs::read_to_string(path).unwrap()
}

/// The README's fenced code blocks, in order.
fn code_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        match (&mut open, line.starts_with("```")) {
            (None, true) => open = Some(String::new()),
            (Some(_), true) => blocks.push(open.take().unwrap()),
            (Some(block), false) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, false) => {}
        }
    }
    blocks
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The shell line without its `# comment`.
fn code_of(line: &str) -> &str {
    line.split(" #").next().unwrap_or(line)
}

/// Variables a shell line sets: `NAME=…`, `export NAME=…`, `for NAME in`.
fn assigned(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = line
        .split([' ', ';', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    for (i, w) in words.iter().enumerate() {
        if let Some((name, _)) = w.split_once('=')
            && !name.is_empty()
            && name.chars().all(is_name_char)
            && !name.starts_with(|c: char| c.is_ascii_digit())
        {
            out.push(name.to_owned());
        }
        if *w == "for" && words.get(i + 2) == Some(&"in") {
            out.push(words[i + 1].to_owned());
        }
    }
    out
}

/// Variables a shell line reads: `$NAME`, `${NAME}`.
fn used(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(at) = rest.find('$') {
        rest = &rest[at + 1..];
        let name: String = rest
            .trim_start_matches('{')
            .chars()
            .take_while(|c| is_name_char(*c))
            .collect();
        if !name.is_empty() {
            out.push(name);
        }
    }
    out
}

#[test]
fn the_readme_fits_300_lines() {
    let n = readme().lines().count();
    assert!(n <= 300, "README.md has {n} lines");
}

#[test]
fn every_shell_variable_is_set_before_a_command_uses_it() {
    let mut set: BTreeSet<String> = BTreeSet::new();
    for block in code_blocks(&readme()) {
        for line in block.lines().map(code_of) {
            for name in used(line) {
                assert!(
                    set.contains(&name),
                    "${name} is used before the README sets it: {line}"
                );
            }
            set.extend(assigned(line));
        }
    }
}

#[test]
fn the_tour_chooses_the_token_first_and_uses_a_key_over_rest() {
    let blocks = code_blocks(&readme());
    let first_dev = blocks
        .iter()
        .position(|b| b.contains("cargo run --release -- dev") && b.contains("LB_ADMIN_TOKEN"))
        .expect("a block that starts dev with LB_ADMIN_TOKEN");
    let starts = &blocks[first_dev];
    assert!(
        starts.find("export LB_ADMIN_TOKEN=") < starts.find("cargo run --release -- dev"),
        "{starts}"
    );
    let rest = blocks[first_dev..].join("\n");
    assert!(rest.contains("TOKEN=$LB_ADMIN_TOKEN"), "{rest}");
    let create = rest.find("/admin/keys").expect("a key created over REST");
    let send = rest
        .find("-H \"X-API-Key: $KEY\"")
        .expect("the key sent with X-API-Key");
    assert!(create < send, "the key is sent before it is created");
}

#[test]
fn the_readme_says_the_cache_key_holds_the_host_and_its_port() {
    let text = readme().replace('\n', " ");
    assert!(
        text.contains("The cache key is the method, the `Host` header"),
        "{text}"
    );
    assert!(
        text.contains("`localhost:8080` and `localhost:8081`"),
        "{text}"
    );
    assert!(text.contains("one DNS name"), "{text}");
}
