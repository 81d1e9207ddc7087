package placement

import (
	"errors"
	"fmt"
	"sync"

	"cel.dev/cel-go/cel"
	"cel.dev/cel-go/checker"
	"cel.dev/cel-go/common/types"
	"cel.dev/cel-go/common/types/ref"
	"cel.dev/cel-go/ext"
	"cel.dev/cel-go/interpreter"
)

const (
	// celCostLimit bounds one evaluation of one `when` expression, in CEL
	// cost units (roughly one per operation, more for string and list
	// work). Real rules cost tens; this leaves room for comprehensions
	// over a few hundred labels while keeping a hostile expression to
	// well under a millisecond. Exceeding it is an evaluation error, and
	// evaluation errors fail closed.
	celCostLimit = 10_000
	// celMaxLen bounds the source of one expression, in code points.
	celMaxLen = 4096
)

// The CEL view of a workload and a node. Field names are snake_case, as in
// the API; the struct tags are what expressions see.
type celWorkload struct {
	Name       string            `cel:"name"`
	Image      string            `cel:"image"`
	Labels     map[string]string `cel:"labels"`
	Tenant     string            `cel:"tenant"`
	Privileged bool              `cel:"privileged"`
	Isolation  string            `cel:"isolation"`
	Resources  celResources      `cel:"resources"`
	// HostPaths are the host directories the workload mounts.
	HostPaths []string `cel:"host_paths"`
}

type celResources struct {
	CPU      float64 `cel:"cpu"`
	MemoryMB int64   `cel:"memory_mb"`
	Pids     int64   `cel:"pids"`
}

type celNode struct {
	VMAvailable        bool              `cel:"vm_available"`
	ContainerAvailable bool              `cel:"container_available"`
	Accel              string            `cel:"accel"`
	Labels             map[string]string `cel:"labels"`
}

// celEnv is built once, the first time a policy uses CEL, and only read
// afterwards: a cel.Env is immutable and safe for concurrent use, and
// building one costs more than compiling a whole policy (and a few MiB an
// agent whose policy has no `when` never needs).
var celEnv = sync.OnceValue(mustCELEnv)

func mustCELEnv() *cel.Env {
	env, err := cel.NewEnv(
		ext.NativeTypes(
			types.ParseStructTags(true),
			types.NativeTypeFor[celWorkload](types.NativeTypeAlias("berth.Workload")),
			types.NativeTypeFor[celResources](types.NativeTypeAlias("berth.Resources")),
			types.NativeTypeFor[celNode](types.NativeTypeAlias("berth.Node")),
		),
		cel.Variable("workload", cel.ObjectType("berth.Workload")),
		cel.Variable("node", cel.ObjectType("berth.Node")),
		// Operators write `workload.resources.cpu > 4`, not `> 4.0`.
		cel.CrossTypeNumericComparisons(true),
		cel.ParserExpressionSizeLimit(celMaxLen),
		ext.Strings(),
	)
	if err != nil {
		// The declarations above are constant; failing here is a bug that
		// every test catches.
		panic(fmt.Sprintf("placement: building the CEL environment: %v", err))
	}
	return env
}

// celError is one compile problem, positioned inside the expression
// (line 1-based, column 0-based in code points, as CEL reports them).
type celError struct {
	line, col int
	msg       string
}

// compileCEL parses, type-checks and plans expr. The result must be bool:
// a `when` that yields a string is a mistake, not a truthy value.
func compileCEL(expr string) (cel.Program, []celError) {
	ast, iss := celEnv().Compile(expr)
	if iss.Err() != nil {
		var out []celError
		for _, e := range iss.Errors() {
			out = append(out, celError{line: e.Location.Line(), col: e.Location.Column(), msg: e.Message})
		}
		return nil, out
	}
	if !ast.OutputType().IsExactType(cel.BoolType) {
		return nil, []celError{{line: 1, col: 0, msg: fmt.Sprintf("expression must be a bool, but it is a %s", ast.OutputType())}}
	}
	// CEL's static estimate is an upper bound on the runtime cost. Where it
	// already proves the expression cheap (comparisons against constants,
	// the common case), runtime cost tracking would only slow every
	// decision down; where the bound depends on the input (comprehensions,
	// regular expressions, string functions), the limit is enforced as the
	// expression runs.
	var opts []cel.ProgramOption
	est, err := celEnv().EstimateCost(ast, noSizeHints{})
	switch {
	case err != nil:
		opts = append(opts, cel.CostLimit(celCostLimit))
	case est.Min > celCostLimit:
		return nil, []celError{{line: 1, col: 0, msg: fmt.Sprintf("expression always costs at least %d, over the cost limit of %d", est.Min, celCostLimit)}}
	case est.Max > celCostLimit:
		opts = append(opts, cel.CostLimit(celCostLimit))
	}
	prg, err := celEnv().Program(ast, opts...)
	if err != nil {
		return nil, []celError{{line: 1, col: 0, msg: err.Error()}}
	}
	return prg, nil
}

// noSizeHints leaves every input size unknown: nothing bounds the labels or
// strings the agent hands over, so the estimate must not assume a bound.
type noSizeHints struct{}

func (noSizeHints) EstimateSize(checker.AstNode) *checker.SizeEstimate { return nil }

func (noSizeHints) EstimateCallCost(string, string, *checker.AstNode, []checker.AstNode) *checker.CallEstimate {
	return nil
}

// hostPaths is never nil: CEL sees an empty list.
func hostPaths(p []string) []string {
	if p == nil {
		return []string{}
	}
	return p
}

// activation binds `workload` and `node` for one Decide call. It is built
// once per decision, on the first rule that needs it, and shared by every
// expression: each rule costs an evaluation, not a conversion.
type activation struct {
	w  celWorkload
	n  celNode
	wv ref.Val
	nv ref.Val
}

var _ interpreter.Activation = (*activation)(nil)

func (a *activation) init(w *Workload, n *NodeFacts) {
	iso := w.Isolation
	if iso == "" {
		iso = IsolationAuto
	}
	a.w = celWorkload{
		Name:       w.Name,
		Image:      w.Image,
		Labels:     w.Labels,
		Tenant:     w.Tenant(),
		Privileged: w.Privileged,
		HostPaths:  hostPaths(w.HostPaths),
		Isolation:  string(iso),
		Resources: celResources{
			CPU:      w.Resources.CPU,
			MemoryMB: w.Resources.MemoryMB,
			Pids:     w.Resources.Pids,
		},
	}
	a.n = celNode{
		VMAvailable:        n.VMAvailable,
		ContainerAvailable: n.ContainerAvailable,
		Accel:              n.Accel,
		Labels:             n.Labels,
	}
	adapter := celEnv().CELTypeAdapter()
	a.wv = adapter.NativeToValue(&a.w)
	a.nv = adapter.NativeToValue(&a.n)
}

func (a *activation) ResolveName(name string) (any, bool) {
	switch name {
	case "workload":
		return a.wv, true
	case "node":
		return a.nv, true
	}
	return nil, false
}

func (a *activation) Parent() interpreter.Activation { return nil }

// errNotBool is reported when an expression typed bool yields something
// else at run time (possible only through dyn values).
var errNotBool = errors.New("result is not a bool")

// evalCEL runs prg. Any error, including hitting the cost limit, is
// returned for the caller to fail closed on.
func evalCEL(prg cel.Program, act *activation) (bool, error) {
	out, _, err := prg.Eval(act)
	if err != nil {
		return false, err
	}
	b, ok := out.(types.Bool)
	if !ok {
		return false, errNotBool
	}
	return bool(b), nil
}
