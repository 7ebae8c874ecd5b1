import { pino, type Logger } from 'pino';

/**
 * One pino JSON logger per process. Level from BLOCKSNAP_LOG (default info);
 * logs go to stderr so stdout stays free for command output (--json).
 */
export function createLogger(name: string, level = process.env.BLOCKSNAP_LOG ?? 'info'): Logger {
  return pino({ name, level, base: { pid: process.pid, name } }, pino.destination(2));
}

export type { Logger };
