//! Chat prompts rendered with the model's own Jinja template (tokenizer_config.json
//! `chat_template` or GGUF `tokenizer.chat_template`) through minijinja, with the Python string
//! methods and helpers (`raise_exception`, `strftime_now`) that Hugging Face templates use.

use minijinja::{Environment, ErrorKind};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

/// ChatML, for models that ship no template.
const FALLBACK: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub fn render(
    template: Option<&str>,
    messages: &[ChatMessage],
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String, TemplateError> {
    let mut env = Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| -> String {
        // Templates use it for "today's date" lines; UTC is as good as any zone here.
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format_date(&fmt, secs)
    });
    let source = template.unwrap_or(FALLBACK);
    env.add_template("chat", source)
        .map_err(|e| TemplateError(e.to_string()))?;
    let t = env
        .get_template("chat")
        .map_err(|e| TemplateError(e.to_string()))?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => true,
        bos_token => bos_token.unwrap_or(""),
        eos_token => eos_token.unwrap_or(""),
    })
    .map_err(|e| TemplateError(e.to_string()))
}

/// `%d %B %Y`-style formatting of a UTC timestamp (the directives templates use).
fn format_date(fmt: &str, secs: u64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    fmt.replace("%d", &format!("{day:02}"))
        .replace("%m", &format!("{month:02}"))
        .replace("%B", MONTHS[(month - 1) as usize])
        .replace("%b", &MONTHS[(month - 1) as usize][..3])
        .replace("%Y", &year.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn user(text: &str) -> Vec<ChatMessage> {
        vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }]
    }

    #[test]
    fn smollm2_template_renders_as_transformers_does() {
        let out = render(Some(SMOLLM2), &user("Hi"), None, None).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role not in ['user'] %}{{ raise_exception('bad role') }}{% endif %}[{{ m.content.strip() }}]{% endfor %}";
        assert_eq!(
            render(Some(t), &user("  x "), Some("<s>"), None).unwrap(),
            "<s>[x]"
        );
        let bad = vec![ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        }];
        assert!(render(Some(t), &bad, None, None)
            .unwrap_err()
            .to_string()
            .contains("bad role"));
    }

    #[test]
    fn dates_format() {
        // 2026-11-30
        assert_eq!(format_date("%d %B %Y", 1_796_000_000), "30 November 2026");
        assert_eq!(format_date("%Y-%m-%d", 0), "1970-01-01");
    }
}
