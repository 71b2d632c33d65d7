"""Model-free n-gram lookahead caches (Raw: per request; Turbo: global, frequency-ranked, bounded)."""
