import { spawn } from 'node:child_process';
import { chmod, copyFile, mkdtemp, readFile, realpath, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { bootId, isAlive, processComm, processCwd, processStartTime, readProcStat } from '../../proto/shared/proc.js';
import { waitFor } from '../support/wait-for.js';

describe('/proc helpers', () => {
  const children: number[] = [];
  let dir: string | undefined;
  afterEach(async () => {
    for (const pid of children.splice(0)) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    if (dir) await rm(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it('this process: running, a start time, and the pid with another start time is not it', async () => {
    const st = await processStartTime(process.pid);
    expect(st).toMatch(/^\d+$/);
    expect(await isAlive(process.pid)).toBe(true);
    expect(await isAlive(process.pid, st)).toBe(true);
    expect(await isAlive(process.pid, Number(st))).toBe(true);
    expect(await isAlive(process.pid, String(Number(st) + 1))).toBe(false);
    expect(await bootId()).toMatch(/^[0-9a-f-]{36}$/);
    expect(await processCwd(process.pid)).toBe(await realpath(process.cwd()));
    expect(await processComm(process.pid)).toMatch(/\S/);
  });

  it('a command name with ") " in it does not shift the fields', async () => {
    dir = await mkdtemp(path.join(tmpdir(), 'bs-proc-'));
    const exe = path.join(dir, 'x) (y');
    await copyFile('/bin/sleep', exe);
    await chmod(exe, 0o755);
    const child = spawn(exe, ['30'], { stdio: 'ignore' });
    children.push(child.pid!);
    await waitFor('the copied sleep to run', async () => (await readProcStat(child.pid!))?.state === 'S', { timeoutMs: 5000 });
    const s = await readProcStat(child.pid!);
    expect(s!.startTime).toMatch(/^\d+$/);
    expect(await processComm(child.pid!)).toBe('x) (y');
    expect(Number(s!.startTime)).toBeGreaterThanOrEqual(Number(await processStartTime(process.pid)));
  });

  it('a zombie (exited, not yet reaped) and a gone pid are not alive', async () => {
    // sh forks sleep and execs into a long sleep without reaping it: the first child turns zombie.
    const child = spawn('sh', ['-c', 'sleep 0 & exec sleep 30'], { stdio: 'ignore' });
    children.push(child.pid!);
    let zombie: number | undefined;
    await waitFor('a zombie child of sh', async () => {
      const kids = (await readFile(`/proc/${child.pid}/task/${child.pid}/children`, 'utf8').catch(() => '')).trim().split(/\s+/).filter(Boolean);
      for (const k of kids) if ((await readProcStat(Number(k)))?.state === 'Z') zombie = Number(k);
      return zombie !== undefined;
    }, { timeoutMs: 5000 });
    expect(await processStartTime(zombie!)).not.toBeNull();
    expect(await isAlive(zombie!)).toBe(false);
    process.kill(child.pid!, 'SIGKILL');
    await waitFor('the zombie to be reaped', async () => (await readProcStat(zombie!)) === null, { timeoutMs: 5000 });
    expect(await isAlive(zombie!)).toBe(false);
    expect(await processStartTime(zombie!)).toBeNull();
  });
});
