import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

/**
 * DESIGN.md is the spec: it names the files that own each format and rule,
 * and copies some layouts from the code that owns them. These checks keep
 * the mechanical part of that promise (names that exist, copies that match).
 */
const root = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const design = readFileSync(join(root, 'DESIGN.md'), 'utf8');

/** The offset table of a format, from a code block of DESIGN.md or a `/** … *\/` header comment. */
function layoutTable(lines: string[], firstLine: RegExp): string[] {
  const start = lines.findIndex((l) => firstLine.test(l));
  expect(start, `a line matching ${firstLine}`).toBeGreaterThanOrEqual(0);
  const out: string[] = [];
  for (const l of lines.slice(start)) {
    if (l.trim() === '' || l.startsWith('```')) break;
    out.push(l.trimEnd());
  }
  return out;
}

describe('DESIGN.md', () => {
  it('names only files that exist', () => {
    const named = new Set<string>();
    for (const m of design.matchAll(/`((?:agent|appliance|proto|test|scripts|vagrant)\/[^`\s]+)`/g)) named.add(m[1]!);
    expect(named.size).toBeGreaterThan(20);
    const missing = [...named].filter((p) => !existsSync(join(root, p.replace(/[.,;:]+$/, ''))));
    expect(missing).toEqual([]);
  });

  it('copies the .cbt layout exactly as agent/cbt/bitmap-file.ts states it', () => {
    const code = readFileSync(join(root, 'agent/cbt/bitmap-file.ts'), 'utf8')
      .split('\n').filter((l) => l.startsWith(' *')).map((l) => l.replace(/^ \* ?/, ''));
    const fromCode = layoutTable(code, /^offset size\s+field$/);
    const cbtSection = design.slice(design.indexOf('`STATE/volumes/<volume>.cbt`'));
    const fromDoc = layoutTable(cbtSection.split('\n'), /^offset size\s+field$/);
    expect(fromCode[1]).toMatch(/"BSNBMAP\\0"/);
    expect(fromCode.at(-1)).toMatch(/^256\s+4\*W\s+bitmap/);
    expect(fromDoc).toEqual(fromCode);
  });
});
