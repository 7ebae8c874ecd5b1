/**
 * /proc helpers, the one place that parses /proc/PID/stat. A process is
 * named by its pid AND its start time (clock ticks since boot, field 22):
 * pids are reused, the pair is not, so a record left by a dead agent, a
 * tracefs instance of a killed tracker or a test's postmaster is never taken
 * for a live stranger's.
 */
import { readFile, readlink } from 'node:fs/promises';

export interface ProcStat {
  /** Field 3: R, S, D, Z (zombie), X (dead), … */
  state: string;
  /** Field 22, as the kernel prints it (a decimal string). */
  startTime: string;
}

/** State and start time of `pid`, or null if there is no such process. */
export async function readProcStat(pid: number): Promise<ProcStat | null> {
  let stat: string;
  try {
    stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // comm (field 2) is in parentheses and may itself contain spaces and ") ": split after the last ')'.
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const startTime = fields[19];
  if (fields[0] === undefined || startTime === undefined || !/^\d+$/.test(startTime)) return null;
  return { state: fields[0], startTime };
}

/** Start time of `pid` in clock ticks since boot, or null if it does not exist. */
export async function processStartTime(pid: number): Promise<string | null> {
  return (await readProcStat(pid))?.startTime ?? null;
}

/**
 * True if `pid` runs (exists and is not a zombie) and, when `startTime` is
 * given, is the very process that was recorded with it.
 */
export async function isAlive(pid: number, startTime: string | number | null = null): Promise<boolean> {
  const s = await readProcStat(pid);
  if (!s || s.state === 'Z' || s.state === 'X') return false;
  return startTime === null || s.startTime === String(startTime);
}

/** The working directory of `pid` (a postmaster's is its data directory), or null. */
export async function processCwd(pid: number): Promise<string | null> {
  return readlink(`/proc/${pid}/cwd`).catch(() => null);
}

/** The command name of `pid` (at most 15 characters), or null. */
export async function processComm(pid: number): Promise<string | null> {
  return readFile(`/proc/${pid}/comm`, 'utf8').then((s) => s.trim(), () => null);
}

/** This boot's id: a pid and start time recorded under another boot name nothing. */
export async function bootId(): Promise<string | null> {
  try {
    return (await readFile('/proc/sys/kernel/random/boot_id', 'utf8')).trim();
  } catch {
    return null;
  }
}
