/**
 * Proves a durable write from the syscalls: runs a small ES module under
 * strace and finds, in order, the temp file opened O_EXCL, its fsync, the
 * rename onto the target, the open of the target's directory and its fsync
 * (DESIGN.md §2, proto/shared/durable-file.ts). Used by every test that
 * checks a writer of durable files.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const haveStrace = existsSync('/usr/bin/strace');

export interface DurableWriteTrace {
  lines: string[];
  /** Indexes into `lines`; -1 when not found. */
  openTmp: number;
  syncTmp: number;
  rename: number;
  openDir: number;
  syncDir: number;
}

/**
 * Runs `code` (an ES module body importing by absolute path, see repoRoot)
 * under strace, with its files in `workDir`, and locates the durable write of
 * `target`, whose temp path contains `tmpMark`.
 */
export function traceDurableWrite(workDir: string, code: string, o: { target: string; tmpMark: string; extraSyscalls?: string[] }): DurableWriteTrace {
  const script = path.join(workDir, `trace-${process.pid}.mts`);
  const log = path.join(workDir, `trace-${process.pid}.log`);
  writeFileSync(script, code);
  const calls = ['openat', 'fsync', 'fdatasync', 'rename', 'renameat', 'renameat2', ...(o.extraSyscalls ?? [])];
  execFileSync('strace', ['-f', '-qq', '-e', `trace=${calls.join(',')}`, '-o', log, process.execPath, '--import', 'tsx', script], { cwd: repoRoot, stdio: 'pipe' });
  const lines = readFileSync(log, 'utf8').split('\n');
  const fdOf = (l: string | undefined) => l?.match(/= (\d+)$/)?.[1];
  const openTmp = lines.findIndex((l) => l.includes('openat(') && l.includes(o.tmpMark) && l.includes('O_EXCL'));
  const syncTmp = openTmp < 0 ? -1 : lines.findIndex((l, i) => i > openTmp && l.includes(`fsync(${fdOf(lines[openTmp])})`));
  const rename = lines.findIndex((l) => /rename/.test(l) && l.includes(`"${o.target}"`));
  const dir = path.dirname(o.target);
  const openDir = rename < 0 ? -1 : lines.findIndex((l, i) => i > rename && l.includes(`"${dir}"`));
  const syncDir = openDir < 0 ? -1 : lines.findIndex((l, i) => i > openDir && l.includes(`fsync(${fdOf(lines[openDir])})`));
  return { lines, openTmp, syncTmp, rename, openDir, syncDir };
}

/** The order every durable write must show; returns the trace for further checks. */
export function expectDurableOrder(t: DurableWriteTrace): DurableWriteTrace {
  expect(t.openTmp).toBeGreaterThanOrEqual(0);
  expect(t.syncTmp).toBeGreaterThan(t.openTmp);
  expect(t.rename).toBeGreaterThan(t.syncTmp);
  expect(t.openDir).toBeGreaterThan(t.rename);
  expect(t.syncDir).toBeGreaterThan(t.openDir);
  return t;
}
