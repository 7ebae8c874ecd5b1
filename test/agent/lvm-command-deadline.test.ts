/**
 * What lvm() (agent/snapshot/lvm/lvm-cli.ts) does with a command past its
 * deadline. An LVM command killed between suspending a device and resuming
 * it leaves the device suspended and the database on it hung, so the command
 * gets SIGINT (LVM stops only where that is safe) and is never killed: one
 * that does not stop runs to its end and the call reports the deadline after
 * it. Real processes (sh stands in for the LVM tool: the LVM lab is the
 * guest suites'); before this rule execa sent SIGTERM and SIGKILL 5 s later.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { LvmCommandError, lvm } from '../../agent/snapshot/lvm/lvm-cli.js';

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-deadline-'));
});
afterAll(() => rm(dir, { recursive: true, force: true }));

it('a command that does not stop on SIGINT is interrupted, not killed: it runs to its end and the deadline is reported', async () => {
  const log = path.join(dir, 'steps');
  // Each step is a separate sleep: the trap runs between two of them, as LVM stops between steps.
  const script = `trap 'echo sigint >> ${log}' INT; echo start >> ${log}; for i in 1 2 3 4 5 6; do sleep 0.2; done; echo end >> ${log}`;
  const err = await lvm('sh', ['-c', script], { timeoutMs: 300, code: 'E_TRACKER' }).then(() => null, (e: unknown) => e);
  expect(err).toBeInstanceOf(LvmCommandError);
  expect((err as LvmCommandError).code).toBe('E_TRACKER');
  expect((err as Error).message).toMatch(/300 ms deadline: interrupted with SIGINT/);
  // Nothing between its steps was cut off: it saw SIGINT and still reached its end.
  expect((await readFile(log, 'utf8')).split('\n').filter(Boolean)).toEqual(['start', 'sigint', 'end']);
});

it('a command that stops on SIGINT (LVM waiting for a lock) ends at its deadline', async () => {
  const started = performance.now();
  const err = await lvm('sleep', ['30'], { timeoutMs: 300 }).then(() => null, (e: unknown) => e);
  expect(err).toBeInstanceOf(LvmCommandError);
  expect((err as Error).message).toMatch(/deadline: interrupted with SIGINT/);
  expect(performance.now() - started).toBeLessThan(10_000);
});
