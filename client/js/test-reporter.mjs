// A node:test reporter that is quiet on success and loud on failure: nothing per passing
// test; every failure in full (name, file:line, the error with its diff and stack), whatever
// the tests print, and one closing summary line, e.g. "js: 279 passed, 0 failed".
// Used by `npm test` (package.json); `node --test test/` alone still gives the full TAP.
import { inspect } from 'node:util'

function where (data) {
  if (!data.file) return ''
  return data.line ? ` (${data.file}:${data.line}:${data.column})` : ` (${data.file})`
}

function describe (error) {
  // node:test wraps what the test threw (ERR_TEST_FAILURE); show the original.
  const shown = error?.code === 'ERR_TEST_FAILURE' && error.cause !== undefined ? error.cause : error
  return inspect(shown, { depth: 6, colors: false }).replace(/^/gm, '    ')
}

export default async function * quietReporter (source) {
  let passed = 0
  let failed = 0
  let skipped = 0
  for await (const { type, data } of source) {
    if (type === 'test:pass' || type === 'test:fail') {
      if (data.details?.type === 'suite') continue // a describe() block: its tests are counted
      if (data.skip !== undefined || data.todo !== undefined) {
        skipped += 1
      } else if (type === 'test:pass') {
        passed += 1
      } else {
        failed += 1
        yield `\nFAIL ${data.name}${where(data)}\n${describe(data.details?.error)}\n`
      }
    } else if (type === 'test:stdout' || type === 'test:stderr') {
      yield data.message
    }
  }
  yield `${failed ? '\n' : ''}js: ${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped` : ''}\n`
}
