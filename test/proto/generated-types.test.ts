import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';

/**
 * proto/generated/blocksnap.d.ts is committed (builds and CI do not run the
 * generator); this fails when it no longer matches what `npm run proto:gen`
 * makes of proto/blocksnap.proto — run that and commit the result.
 */
const root = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const committedPath = join(root, 'proto/generated/blocksnap.d.ts');
const dir = mkdtempSync(join(tmpdir(), 'blocksnap-generated-types-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function generate(out: string, proto?: string): Promise<string> {
  await promisify(execFile)(process.execPath, [join(root, 'scripts/proto-gen.mjs'), out, ...(proto ? [proto] : [])], { cwd: root });
  return readFileSync(out, 'utf8');
}

describe('generated message types', () => {
  it('proto/generated/blocksnap.d.ts is what npm run proto:gen makes of the .proto (else: run it and commit)', async () => {
    const fresh = await generate(join(dir, 'fresh.d.ts'));
    expect(fresh === readFileSync(committedPath, 'utf8'), 'proto/generated/blocksnap.d.ts is stale: run `npm run proto:gen`').toBe(true);
  }, 60_000);

  it('a field added to the .proto changes the generated file (so a stale one is caught)', async () => {
    const proto = join(dir, 'blocksnap.proto');
    const src = readFileSync(join(root, 'proto/blocksnap.proto'), 'utf8');
    const edited = src.replace(/(message Ack \{[^}]*)\}/, '$1  uint64 added_for_test = 99;\n}');
    expect(edited).not.toBe(src);
    writeFileSync(proto, edited);
    const out = await generate(join(dir, 'edited.d.ts'), proto);
    expect(out).not.toBe(readFileSync(committedPath, 'utf8'));
    expect(out).toMatch(/addedForTest\?: \(number\|Long\|null\)/);
  }, 60_000);
});
