//! A recursive-descent parser and evaluator for arithmetic over `f64`.
//!
//! Grammar, loosest binding first:
//!
//! ```text
//! expr    := term (('+' | '-') term)*
//! term    := unary (('*' | '/' | '%') unary)*
//! unary   := ('-' | '+') unary | power
//! power   := primary ('^' unary)?
//! primary := number | '(' expr ')'
//! number  := digits ['.' digits] | '.' digits, then optionally ('e' | 'E') ['+' | '-'] digits
//! ```
//!
//! `power` takes a `unary` on its right, which makes `^` right-associative
//! (`2^3^2` is `2^9`) and allows `2^-1`, while a leading minus applies to the
//! whole power (`-2^2` is `-4`, as in mathematics).
//!
//! Positions in error messages count characters (not bytes) from 1.

use std::fmt;

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq)]
pub enum EvalError {
    /// The text is not a well-formed expression, or its value is undefined.
    Invalid(String),
    /// A division, remainder or negative power of zero.
    DivisionByZero(String),
}

impl EvalError {
    /// The machine-readable code reported in the tool error.
    pub fn code(&self) -> &'static str {
        match self {
            EvalError::Invalid(_) => "invalid_expression",
            EvalError::DivisionByZero(_) => "division_by_zero",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            EvalError::Invalid(message) | EvalError::DivisionByZero(message) => message,
        }
    }
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for EvalError {}

/// Evaluates `expression`, returning a finite number.
pub fn evaluate(expression: &str) -> Result<f64, EvalError> {
    let tokens = tokenize(expression)?;
    if tokens.len() == 1 {
        // Only the end marker: nothing but whitespace.
        return Err(EvalError::Invalid("the expression is empty".into()));
    }
    let mut parser = Parser { tokens, next: 0 };
    let value = parser.expr()?;
    match parser.peek() {
        Token {
            kind: Kind::End, ..
        } => Ok(value),
        token => Err(unexpected(token)),
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Number(f64),
    /// One of `+ - * / % ^ ( )`.
    Symbol(char),
    End,
}

#[derive(Debug, Clone)]
struct Token {
    kind: Kind,
    /// 1-based character position of the token's first character.
    position: usize,
    /// The token as written, for error messages.
    text: String,
}

fn tokenize(input: &str) -> Result<Vec<Token>, EvalError> {
    let chars: Vec<char> = input.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let position = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            // An exponent only when digits follow, so that a stray `e` is
            // reported as the unexpected character it is.
            if i < chars.len() && matches!(chars[i], 'e' | 'E') {
                let mut j = i + 1;
                if j < chars.len() && matches!(chars[j], '+' | '-') {
                    j += 1;
                }
                if j < chars.len() && chars[j].is_ascii_digit() {
                    i = j;
                    while i < chars.len() && chars[i].is_ascii_digit() {
                        i += 1;
                    }
                }
            }
            let text: String = chars[start..i].iter().collect();
            // Rust's float parser accepts exactly this shape (`.5`, `2.`,
            // `1e3`), and rejects `1.2.3` or a lone `.`.
            let value = text.parse::<f64>().map_err(|_| {
                EvalError::Invalid(format!("invalid number '{text}' at position {position}"))
            })?;
            if !value.is_finite() {
                return Err(EvalError::Invalid(format!(
                    "the number '{text}' at position {position} is too large"
                )));
            }
            tokens.push(Token {
                kind: Kind::Number(value),
                position,
                text,
            });
        } else if "+-*/%^()".contains(c) {
            tokens.push(Token {
                kind: Kind::Symbol(c),
                position,
                text: c.to_string(),
            });
            i += 1;
        } else {
            return Err(EvalError::Invalid(format!(
                "unexpected character '{c}' at position {position}"
            )));
        }
    }
    tokens.push(Token {
        kind: Kind::End,
        position: chars.len() + 1,
        text: String::new(),
    });
    Ok(tokens)
}

fn unexpected(token: &Token) -> EvalError {
    let message = match token.kind {
        Kind::End => format!(
            "unexpected end of expression at position {}",
            token.position
        ),
        Kind::Number(_) => format!(
            "unexpected number '{}' at position {}",
            token.text, token.position
        ),
        Kind::Symbol(_) => format!("unexpected '{}' at position {}", token.text, token.position),
    };
    EvalError::Invalid(message)
}

struct Parser {
    /// Always ends with a `Kind::End` token, so `peek` never runs out.
    tokens: Vec<Token>,
    next: usize,
}

impl Parser {
    fn peek(&self) -> &Token {
        &self.tokens[self.next]
    }

    /// Consumes the next token if it is one of `symbols`.
    fn eat(&mut self, symbols: &str) -> Option<Token> {
        let token = self.peek();
        match token.kind {
            Kind::Symbol(c) if symbols.contains(c) => {
                let token = token.clone();
                self.next += 1;
                Some(token)
            }
            _ => None,
        }
    }

    fn expr(&mut self) -> Result<f64, EvalError> {
        let mut value = self.term()?;
        while let Some(op) = self.eat("+-") {
            let rhs = self.term()?;
            value = apply(&op, value, rhs)?;
        }
        Ok(value)
    }

    fn term(&mut self) -> Result<f64, EvalError> {
        let mut value = self.unary()?;
        while let Some(op) = self.eat("*/%") {
            let rhs = self.unary()?;
            value = apply(&op, value, rhs)?;
        }
        Ok(value)
    }

    fn unary(&mut self) -> Result<f64, EvalError> {
        match self.eat("+-") {
            Some(op) if op.text == "-" => Ok(-self.unary()?),
            Some(_) => self.unary(),
            None => self.power(),
        }
    }

    fn power(&mut self) -> Result<f64, EvalError> {
        let base = self.primary()?;
        match self.eat("^") {
            Some(op) => {
                let exponent = self.unary()?;
                apply(&op, base, exponent)
            }
            None => Ok(base),
        }
    }

    fn primary(&mut self) -> Result<f64, EvalError> {
        let token = self.peek().clone();
        match token.kind {
            Kind::Number(value) => {
                self.next += 1;
                Ok(value)
            }
            Kind::Symbol('(') => {
                self.next += 1;
                let value = self.expr()?;
                if self.eat(")").is_some() {
                    return Ok(value);
                }
                let next = self.peek();
                if next.kind == Kind::End {
                    Err(EvalError::Invalid(format!(
                        "missing ')' to close the '(' at position {}",
                        token.position
                    )))
                } else {
                    Err(unexpected(next))
                }
            }
            _ => Err(unexpected(&token)),
        }
    }
}

/// Applies a binary operator, refusing results that are not finite numbers
/// so that an overflow is reported where it happens rather than silently
/// turning into `inf` (or `0` after a later division).
fn apply(op: &Token, lhs: f64, rhs: f64) -> Result<f64, EvalError> {
    let position = op.position;
    let value = match op.text.as_str() {
        "+" => lhs + rhs,
        "-" => lhs - rhs,
        "*" => lhs * rhs,
        "/" | "%" if rhs == 0.0 => {
            return Err(EvalError::DivisionByZero(format!(
                "division by zero: the right operand of '{}' at position {position} is zero",
                op.text
            )));
        }
        "/" => lhs / rhs,
        "%" => lhs % rhs,
        "^" if lhs == 0.0 && rhs < 0.0 => {
            return Err(EvalError::DivisionByZero(format!(
                "division by zero: zero raised to a negative power by '^' at position {position}"
            )));
        }
        "^" => lhs.powf(rhs),
        other => unreachable!("the parser only applies binary operators, not '{other}'"),
    };
    if value.is_finite() {
        Ok(value)
    } else if value.is_nan() {
        Err(EvalError::Invalid(format!(
            "the result of '{}' at position {position} is undefined",
            op.text
        )))
    } else {
        Err(EvalError::Invalid(format!(
            "the result of '{}' at position {position} is too large",
            op.text
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(expression: &str) -> f64 {
        evaluate(expression).unwrap_or_else(|e| panic!("{expression:?} failed: {e}"))
    }

    fn invalid(expression: &str) -> String {
        match evaluate(expression) {
            Err(EvalError::Invalid(message)) => message,
            other => panic!("{expression:?} should be invalid, got {other:?}"),
        }
    }

    #[test]
    fn numbers() {
        assert_eq!(eval("42"), 42.0);
        assert_eq!(eval("2.50"), 2.5);
        assert_eq!(eval(".5"), 0.5);
        assert_eq!(eval("2."), 2.0);
        assert_eq!(eval("1e3"), 1000.0);
        assert_eq!(eval("1E3"), 1000.0);
        assert_eq!(eval("2.5e-1"), 0.25);
        assert_eq!(eval("1e+2"), 100.0);
        assert_eq!(eval(".5e1"), 5.0);
    }

    #[test]
    fn precedence() {
        assert_eq!(eval("2+3*4"), 14.0);
        assert_eq!(eval("2*3+4"), 10.0);
        assert_eq!(eval("10-4/2"), 8.0);
        assert_eq!(eval("7+10%4"), 9.0);
        assert_eq!(eval("2*3^2"), 18.0);
        assert_eq!(eval("2^3*2"), 16.0);
        assert_eq!(eval("1+2*3^2-4/2"), 17.0);
    }

    #[test]
    fn associativity() {
        assert_eq!(eval("10-3-2"), 5.0);
        assert_eq!(eval("64/4/2"), 8.0);
        assert_eq!(eval("100%7%4"), 2.0);
        assert_eq!(eval("2^3^2"), 512.0);
        assert_eq!(eval("(2^3)^2"), 64.0);
    }

    #[test]
    fn unary_operators() {
        assert_eq!(eval("-3"), -3.0);
        assert_eq!(eval("+3"), 3.0);
        assert_eq!(eval("--3"), 3.0);
        assert_eq!(eval("-+-3"), 3.0);
        assert_eq!(eval("2*-3"), -6.0);
        assert_eq!(eval("2--3"), 5.0);
        assert_eq!(eval("-2^2"), -4.0);
        assert_eq!(eval("(-2)^2"), 4.0);
        assert_eq!(eval("2^-1"), 0.5);
        assert_eq!(eval("2^-1^2"), 0.5);
        assert_eq!(eval("-(1+2)"), -3.0);
    }

    #[test]
    fn parentheses_and_whitespace() {
        assert_eq!(eval("(2+3)*4"), 20.0);
        assert_eq!(eval("((((1))))"), 1.0);
        assert_eq!(eval("2*(3+(4-1))"), 12.0);
        assert_eq!(eval("  ( 2 + 3 ) *\t4\n"), 20.0);
    }

    #[test]
    fn remainder_and_fractions() {
        assert_eq!(eval("-7%3"), -1.0);
        assert_eq!(eval("7.5%2"), 1.5);
        assert_eq!(eval("1/4"), 0.25);
        assert_eq!(eval("4^0.5"), 2.0);
    }

    #[test]
    fn syntax_errors_name_the_position() {
        assert_eq!(invalid("(1+2))"), "unexpected ')' at position 6");
        assert_eq!(invalid("1+2)"), "unexpected ')' at position 4");
        assert_eq!(invalid("1 +"), "unexpected end of expression at position 4");
        assert_eq!(invalid("*2"), "unexpected '*' at position 1");
        assert_eq!(invalid("2 3"), "unexpected number '3' at position 3");
        assert_eq!(invalid("2(3)"), "unexpected '(' at position 2");
        assert_eq!(invalid("()"), "unexpected ')' at position 2");
        assert_eq!(
            invalid("(1+2"),
            "missing ')' to close the '(' at position 1"
        );
        assert_eq!(invalid("2 ^ ^ 3"), "unexpected '^' at position 5");
        assert_eq!(invalid("2x"), "unexpected character 'x' at position 2");
        assert_eq!(invalid("2e"), "unexpected character 'e' at position 2");
        assert_eq!(invalid("1.2.3"), "invalid number '1.2.3' at position 1");
        assert_eq!(invalid("1 + ."), "invalid number '.' at position 5");
        // Positions count characters, not bytes: '×' is two bytes in UTF-8.
        assert_eq!(
            invalid("1 × 2 × 3"),
            "unexpected character '×' at position 3"
        );
        assert_eq!(invalid(""), "the expression is empty");
        assert_eq!(invalid("   "), "the expression is empty");
    }

    #[test]
    fn division_by_zero() {
        for expression in ["1/0", "0/0", "5 % 0", "1/(2-2)", "0^-1"] {
            let error = evaluate(expression).unwrap_err();
            assert_eq!(error.code(), "division_by_zero", "{expression}");
        }
        assert_eq!(
            evaluate("1/0").unwrap_err().message(),
            "division by zero: the right operand of '/' at position 2 is zero"
        );
    }

    #[test]
    fn non_finite_results_are_errors() {
        assert_eq!(
            invalid("10^400"),
            "the result of '^' at position 3 is too large"
        );
        assert_eq!(
            invalid("1e308*10"),
            "the result of '*' at position 6 is too large"
        );
        assert_eq!(
            invalid("(-8)^0.5"),
            "the result of '^' at position 5 is undefined"
        );
        assert_eq!(
            invalid("1e999"),
            "the number '1e999' at position 1 is too large"
        );
    }
}
