// Parse AsyncAPI documents with the official parser (@asyncapi/parser, which runs offline once
// installed) and print every diagnostic, then one line per file: "OK: FILE ..." or "INVALID: FILE ...".
// Exit status: 0 all valid; 1 any file with an error-severity diagnostic (or, with --strict, a
// warning); 2 bad usage.
//
//   node validate.mjs [--strict] FILE...
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';

const args = process.argv.slice(2);
const strict = args.includes('--strict');
const files = args.filter((a) => !a.startsWith('--'));
if (files.length === 0) {
  console.error('usage: node validate.mjs [--strict] FILE...');
  process.exit(2);
}

const severityNames = {
  [DiagnosticSeverity.Error]: 'error',
  [DiagnosticSeverity.Warning]: 'warning',
  [DiagnosticSeverity.Information]: 'info',
  [DiagnosticSeverity.Hint]: 'hint',
};

const parser = new Parser();
let failed = false;
for (const name of files) {
  const file = path.resolve(name);
  const source = await readFile(file, 'utf8');
  const { document, diagnostics } = await parser.parse(source, { source: file });
  for (const d of diagnostics) {
    const where = d.path && d.path.length ? d.path.join('.') : '(root)';
    const line = d.range ? `:${d.range.start.line + 1}` : '';
    console.log(`${severityNames[d.severity] ?? d.severity} ${d.code} ${file}${line} ${where}: ${d.message}`);
  }
  const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).length;
  const warnings = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Warning).length;
  if (!document || errors || (strict && warnings)) {
    failed = true;
    console.log(`INVALID: ${file}: ${errors} error(s), ${warnings} warning(s)`);
  } else {
    console.log(
      `OK: ${file}: AsyncAPI ${document.version()}, ${document.channels().length} channels, ` +
        `${document.operations().length} operations, ${document.allMessages().length} messages, ` +
        `${warnings} warning(s)`,
    );
  }
}
process.exit(failed ? 1 : 0);
