package client

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/nlvpn/nlvpn/control"
	"github.com/nlvpn/nlvpn/identity"
	"github.com/nlvpn/nlvpn/token"
	"github.com/nlvpn/nlvpn/underlay"
	"github.com/nlvpn/nlvpn/wire"
)

// ListConfig says how to reach the gateway for ListAgents.
type ListConfig struct {
	Gateway  string // host:port
	Gateways []string
	Pin      string
	Token    string // the client's credential
	Key      *identity.Key
	Log      *slog.Logger
}

// ListAgents registers with the gateway as the client (its own overlay
// slot, as `nlvpn connect` does, so a running `up` is not disturbed) and
// asks which agents this client may use, online or not, with the subnets
// they advertised last. The subnets are the gateway's word: a session
// still takes them from the agent itself.
func ListAgents(ctx context.Context, cfg ListConfig) (*wire.Agents, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	u, err := underlay.Open(control.Config{Gateway: cfg.Gateway, Gateways: cfg.Gateways, Pin: cfg.Pin, Token: cfg.Token, Key: cfg.Key, Log: cfg.Log})
	if err != nil {
		return nil, err
	}
	defer u.Close()
	runErr := u.Start()
	defer u.Stop()
	if _, err := u.Ctrl.Ready(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) {
			return nil, fmt.Errorf("cannot reach the gateway at %s", cfg.Gateway)
		}
		return nil, err
	}
	r, err := u.Ctrl.Request(ctx, &wire.Message{Type: wire.TypeAgents, Agents: &wire.Agents{}})
	if err != nil {
		var we *wire.Error
		if errors.As(err, &we) && we.Code == wire.CodeBadRequest {
			return nil, fmt.Errorf("the gateway cannot list agents (an older version?): %s", we.Message)
		}
		select {
		case err := <-runErr:
			return nil, err
		default:
		}
		return nil, fmt.Errorf("asking the gateway: %w", err)
	}
	if r.Type != wire.TypeAgents {
		return nil, fmt.Errorf("the gateway answered %s instead of a list of agents", r.Type)
	}
	// The list is the gateway's word, printed on a terminal: a name that
	// is not an agent name (control characters, escape sequences) is left
	// out and said so.
	l := &wire.Agents{Truncated: r.Agents.Truncated}
	for _, a := range r.Agents.Agents {
		if !token.ValidName(a.Name) {
			cfg.Log.Warn("the gateway listed an agent with an invalid name; left out", "name", fmt.Sprintf("%q", a.Name))
			continue
		}
		l.Agents = append(l.Agents, a)
	}
	return l, nil
}
