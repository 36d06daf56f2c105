#!/usr/bin/env node
// Renders TeX with KaTeX in strict mode, for tests/test_markdown_katex.py.
//
// stdin:  a JSON array of {"tex": string, "display": bool}
// stdout: a JSON array of the same length: null where KaTeX rendered the expression,
//         else KaTeX's error message.
// One process renders every expression. KaTeX comes from ./node_modules (`bash .ci/install`).
"use strict";

const katex = require("katex");

function main(input) {
    const items = JSON.parse(input);
    if (!Array.isArray(items)) {
        throw new TypeError("expected a JSON array of {tex, display}");
    }
    const results = items.map(({ tex, display }) => {
        try {
            katex.renderToString(tex, {
                displayMode: Boolean(display),
                throwOnError: true,
                strict: "error",
            });
            return null;
        } catch (err) {
            return String(err && err.message ? err.message : err);
        }
    });
    process.stdout.write(JSON.stringify(results));
}

const chunks = [];
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => chunks.push(chunk));
process.stdin.on("end", () => main(chunks.join("")));
