package placement

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxGlobLen bounds a pattern: real image globs are short, and the compiled
// form of a long one costs memory in every policy kept around.
const maxGlobLen = 512

// glob matches normalized image references.
//
//   - any run of characters except '/'
//     **     any run of characters, '/' included
//     ?      one character except '/'
//     [a-z]  one character in the class; [!a-z] or [^a-z] negates
//     \x     the character x itself
//
// The pattern must match the whole reference. A pattern that names no tag
// or digest (no '@', no ':' after its last '/') also matches every tag and
// digest of the repositories it matches: "docker.io/evil/app" matches
// "docker.io/evil/app:1.0". Without that, a deny rule written without a tag
// would silently miss every real reference.
type glob struct {
	pattern string
	re      *regexp.Regexp
	anyTag  bool
	// prefix is the pattern's literal start. Most image globs name a
	// registry or repository up front, so most references are rejected by
	// one HasPrefix without running the regexp.
	prefix string
}

// compileGlob translates the pattern into an anchored regular expression:
// RE2 matches in linear time, so no pattern can make Decide slow.
func compileGlob(pattern string) (*glob, error) {
	switch {
	case pattern == "":
		return nil, errors.New("empty pattern")
	case len(pattern) > maxGlobLen:
		return nil, fmt.Errorf("pattern is %d bytes; the limit is %d", len(pattern), maxGlobLen)
	case !utf8.ValidString(pattern):
		return nil, errors.New("pattern is not valid UTF-8")
	case strings.IndexFunc(pattern, unicode.IsSpace) >= 0:
		return nil, errors.New("pattern contains white space, which no image reference does")
	}
	var re strings.Builder
	re.WriteString(`^(?s:`)
	for i := 0; i < len(pattern); {
		c := pattern[i]
		switch c {
		case '*':
			j := i
			for j < len(pattern) && pattern[j] == '*' {
				j++
			}
			if j-i == 1 {
				re.WriteString(`[^/]*`)
			} else {
				re.WriteString(`.*`)
			}
			i = j
		case '?':
			re.WriteString(`[^/]`)
			i++
		case '[':
			n, err := writeClass(&re, pattern[i:])
			if err != nil {
				return nil, err
			}
			i += n
		case '\\':
			if i+1 == len(pattern) {
				return nil, errors.New(`pattern ends in an unfinished escape "\"`)
			}
			r, size := utf8.DecodeRuneInString(pattern[i+1:])
			re.WriteString(regexp.QuoteMeta(string(r)))
			i += 1 + size
		default:
			r, size := utf8.DecodeRuneInString(pattern[i:])
			re.WriteString(regexp.QuoteMeta(string(r)))
			i += size
		}
	}
	re.WriteString(`)$`)
	compiled, err := regexp.Compile(re.String())
	if err != nil {
		// The translation only emits valid syntax; this is a bug, but the
		// caller still reports it against the pattern.
		return nil, fmt.Errorf("internal error compiling pattern: %w", err)
	}
	tail := pattern[strings.LastIndexByte(pattern, '/')+1:]
	prefix, _ := compiled.LiteralPrefix()
	return &glob{
		pattern: pattern,
		re:      compiled,
		anyTag:  !strings.Contains(pattern, "@") && !strings.Contains(tail, ":"),
		prefix:  prefix,
	}, nil
}

// writeClass translates the character class at the start of s and returns
// how many bytes of s it used.
func writeClass(re *strings.Builder, s string) (int, error) {
	i := 1
	re.WriteByte('[')
	if i < len(s) && (s[i] == '!' || s[i] == '^') {
		// Like ?, a negated class stays within one path segment.
		re.WriteString(`^/`)
		i++
	}
	members := 0
	for {
		if i >= len(s) {
			return 0, errors.New(`unterminated character class: missing "]"`)
		}
		if s[i] == ']' && members > 0 {
			re.WriteByte(']')
			return i + 1, nil
		}
		lo, n, err := classChar(s[i:])
		if err != nil {
			return 0, err
		}
		i += n
		hi := lo
		if i+1 < len(s) && s[i] == '-' && s[i+1] != ']' {
			hi, n, err = classChar(s[i+1:])
			if err != nil {
				return 0, err
			}
			if hi < lo {
				return 0, fmt.Errorf("bad range %q-%q in character class", lo, hi)
			}
			i += 1 + n
		}
		fmt.Fprintf(re, `\x{%x}`, lo)
		if hi != lo {
			fmt.Fprintf(re, `-\x{%x}`, hi)
		}
		members++
	}
}

// classChar decodes one (possibly escaped) character of a class.
func classChar(s string) (rune, int, error) {
	n := 0
	if s[0] == '\\' {
		if len(s) == 1 {
			return 0, 0, errors.New(`unterminated character class: missing "]"`)
		}
		n = 1
	}
	r, size := utf8.DecodeRuneInString(s[n:])
	return r, n + size, nil
}

// match reports whether ref, a normalized image reference, matches.
func (g *glob) match(ref string) bool {
	// The repository is a prefix of ref, so this rejects both tries.
	if !strings.HasPrefix(ref, g.prefix) {
		return false
	}
	if g.re.MatchString(ref) {
		return true
	}
	if !g.anyTag {
		return false
	}
	repo := repository(ref)
	return len(repo) != len(ref) && g.re.MatchString(repo)
}

// repository strips the tag and digest off a reference:
// "localhost:5000/app:1@sha256:..." becomes "localhost:5000/app".
func repository(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	slash := strings.LastIndexByte(ref, '/')
	if i := strings.LastIndexByte(ref, ':'); i > slash {
		ref = ref[:i]
	}
	return ref
}
