package snapshot

import "context"

// progressKey is the context key of a progress function.
type progressKey struct{}

// WithProgress returns a context that carries report, which long backend
// operations (import, the merge of a snapshot delete) call now and then
// with the bytes done out of the total. The CLI draws its progress bar
// from it; report may be called from several goroutines.
func WithProgress(ctx context.Context, report func(done, total int64)) context.Context {
	return context.WithValue(ctx, progressKey{}, report)
}

// ProgressFrom returns the progress function of ctx, or nil.
func ProgressFrom(ctx context.Context) func(done, total int64) {
	report, _ := ctx.Value(progressKey{}).(func(done, total int64))
	return report
}
