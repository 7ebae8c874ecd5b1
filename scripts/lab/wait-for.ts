/**
 * Waits on a condition with a deadline: the way tests wait for something to
 * happen, never a fixed sleep that decides an outcome. Polls `cond` every
 * `everyMs` until it is true; after `timeoutMs` throws naming `what` (and,
 * if given, what `detail` says the state was).
 */
export async function waitFor(
  what: string,
  cond: () => boolean | Promise<boolean>,
  opts: { timeoutMs?: number; everyMs?: number; detail?: () => string | Promise<string> } = {},
): Promise<void> {
  const deadline = Date.now() + (opts.timeoutMs ?? 30_000);
  for (;;) {
    if (await cond()) return;
    if (Date.now() > deadline) {
      const detail = opts.detail ? `: ${await opts.detail()}` : '';
      throw new Error(`timed out after ${opts.timeoutMs ?? 30_000} ms waiting for ${what}${detail}`);
    }
    await new Promise((r) => setTimeout(r, opts.everyMs ?? 25));
  }
}
